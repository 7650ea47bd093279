"""Aggregators for windows: ``Count``, ``Sum``, ``Mean``, ``Min``, ``Max``, ``Collect`` and ``Reduce``.

An aggregator is four small functions over an accumulator that must be JSON data (it is snapshotted):
``zero()``, ``add(acc, value)``, ``merge(a, b)`` (session windows merge) and ``result(acc)``.
``Sum``, ``Mean``, ``Min`` and ``Max`` read a field of the record (a name, a function, or the record itself).

Example:
    >>> agg = Named({"n": Count(), "avg": Mean("v")})
    >>> acc = agg.zero()
    >>> for r in ({"v": 1.0}, {"v": 3.0}):
    ...     acc = agg.add(acc, r)
    >>> agg.result(acc)
    {'n': 2, 'avg': 2.0}
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.windows.clock import field_getter

__all__ = ["Aggregator", "Collect", "Count", "Max", "Mean", "Min", "Named", "Reduce", "Sum", "as_aggregator"]

Field = str | Callable[[Any], Any] | None


class Aggregator(abc.ABC):
    """Folds the records of one window into a result."""

    @abc.abstractmethod
    def zero(self) -> Any:
        """The empty accumulator (JSON data)."""

    @abc.abstractmethod
    def add(self, acc: Any, value: Any) -> Any:
        """Fold one record in; may mutate and return ``acc``."""

    @abc.abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Combine two accumulators (used when session windows merge)."""

    def result(self, acc: Any) -> Any:
        """The window's result from its accumulator."""
        return acc


class Count(Aggregator):
    """Number of records."""

    def zero(self) -> int:
        return 0

    def add(self, acc: int, value: Any) -> int:
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b


class _FieldAggregator(Aggregator):
    def __init__(self, field: Field = None) -> None:
        self.field = field
        self.get = field_getter(field)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r})"


class Sum(_FieldAggregator):
    """Sum of a field."""

    def zero(self) -> float:
        return 0

    def add(self, acc: Any, value: Any) -> Any:
        return acc + self.get(value)

    def merge(self, a: float, b: float) -> float:
        return a + b


class Mean(_FieldAggregator):
    """Arithmetic mean of a field (``None`` for an empty window)."""

    def zero(self) -> list[float]:
        return [0, 0.0]

    def add(self, acc: list[float], value: Any) -> list[float]:
        acc[0] += 1
        acc[1] += self.get(value)
        return acc

    def merge(self, a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, acc: list[float]) -> float | None:
        return acc[1] / acc[0] if acc[0] else None


class Min(_FieldAggregator):
    """Smallest value of a field (``None`` for an empty window)."""

    def zero(self) -> Any:
        return None

    def add(self, acc: Any, value: Any) -> Any:
        v = self.get(value)
        return v if acc is None or v < acc else acc

    def merge(self, a: Any, b: Any) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return min(a, b)


class Max(Min):
    """Largest value of a field (``None`` for an empty window)."""

    def add(self, acc: Any, value: Any) -> Any:
        v = self.get(value)
        return v if acc is None or v > acc else acc

    def merge(self, a: Any, b: Any) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return max(a, b)


class Collect(_FieldAggregator):
    """All values (of a field) in arrival order."""

    def zero(self) -> list[Any]:
        return []

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        acc.append(self.get(value))
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return a + b


class Reduce(Aggregator):
    """Folds records pairwise with ``fn(acc, value)``; the first record is the start. Result: the fold."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn

    def zero(self) -> list[Any]:
        return []  # [] = empty, [acc] = has a value

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        if acc:
            acc[0] = self.fn(acc[0], value)
        else:
            acc.append(value)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        if not a:
            return b
        if not b:
            return a
        return [self.fn(a[0], b[0])]

    def result(self, acc: list[Any]) -> Any:
        return acc[0] if acc else None


class Named(Aggregator):
    """Several aggregators over the same records; the result is a dict ``{name: result}``."""

    def __init__(self, aggregators: dict[str, Aggregator]) -> None:
        if not aggregators:
            raise ConfigurationError("aggregate() needs at least one aggregator")
        for name, agg in aggregators.items():
            if not isinstance(agg, Aggregator):
                raise ConfigurationError(f"aggregator {name!r} is a {type(agg).__name__}, not an Aggregator")
        self.names = list(aggregators)
        self.aggs = list(aggregators.values())
        self._fast = _compile_fast_add(self.aggs, self._add_each)

    @property
    def _fast(self) -> Callable[[list[Any], Any], list[Any]] | None:
        """The generated fold, when every aggregator has one: it is then this instance's ``add`` (one call per
        value on the hot path); ``None`` makes ``add`` the general path again."""
        return self._fast_add

    @_fast.setter
    def _fast(self, fold: Callable[[list[Any], Any], list[Any]] | None) -> None:
        self._fast_add = fold
        if fold is None:
            self.__dict__.pop("add", None)
        else:
            self.add = fold  # type: ignore[method-assign,assignment]

    def zero(self) -> list[Any]:
        return [a.zero() for a in self.aggs]

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        return self._add_each(acc, value)

    def _add_each(self, acc: list[Any], value: Any) -> list[Any]:
        """Each aggregator in turn (the general path; the fast one comes here when a field is missing or the
        record is not a dict, so that the aggregator that needs it says what is wrong)."""
        for i, a in enumerate(self.aggs):
            acc[i] = a.add(acc[i], value)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [agg.merge(x, y) for agg, x, y in zip(self.aggs, a, b, strict=True)]

    def result(self, acc: list[Any]) -> dict[str, Any]:
        return {name: agg.result(x) for name, agg, x in zip(self.names, self.aggs, acc, strict=True)}


def _compile_fast_add(
    aggs: list[Aggregator], general: Callable[[list[Any], Any], list[Any]]
) -> Callable[[list[Any], Any], list[Any]] | None:
    """One function folding a dict record into every built-in aggregator at once (the hot path of windows).

    Only for exact ``Count``/``Sum``/``Mean``/``Min``/``Max`` over field names (or the record itself); any
    other aggregator keeps the general path. The generated code reads every field (handing the record to
    ``general`` when one is missing, so the general path can say which), computes every new value, and only
    then writes them: a value that fails (say, a string where a number belongs) leaves the accumulator unchanged.
    """
    fields: dict[str | None, str] = {}
    compute: list[str] = []
    store: list[str] = []
    for i, agg in enumerate(aggs):
        kind = type(agg)
        if kind is Count:
            compute.append(f"    n{i} = acc[{i}] + 1")
            store.append(f"    acc[{i}] = n{i}")
            continue
        if kind not in (Sum, Mean, Min, Max):
            return None
        field = agg.field  # type: ignore[attr-defined]
        if field is not None and not isinstance(field, str):
            return None
        var = fields.setdefault(field, f"v{len(fields)}")
        if kind is Sum:
            compute.append(f"    n{i} = acc[{i}] + {var}")
            store.append(f"    acc[{i}] = n{i}")
        elif kind is Mean:
            compute.append(f"    m{i} = acc[{i}]\n    c{i} = m{i}[0] + 1\n    s{i} = m{i}[1] + {var}")
            store.append(f"    m{i}[0] = c{i}\n    m{i}[1] = s{i}")
        else:
            op = "<" if kind is Min else ">"
            compute.append(f"    a{i} = acc[{i}]\n    n{i} = {var} if a{i} is None or {var} {op} a{i} else a{i}")
            store.append(f"    acc[{i}] = n{i}")
    reads = [
        f"        {var} = value[{name!r}]" if name is not None else f"        {var} = value"
        for name, var in fields.items()
    ]
    source = "\n".join(
        [
            "def add(acc, value):",
            "    try:",
            *(reads or ["        pass"]),
            "    except (KeyError, TypeError, IndexError):",
            "        return general(acc, value)",
            *compute,
            *store,
            "    return acc",
            "",
        ]
    )
    namespace: dict[str, Any] = {"general": general}
    exec(compile(source, "<taskstream aggregators>", "exec"), namespace)  # built from our own names only
    fast: Callable[[list[Any], Any], list[Any]] = namespace["add"]
    return fast


def as_aggregator(single: Aggregator | None, named: dict[str, Aggregator]) -> Named:
    """``aggregate(Mean("v"))`` -> ``{"value": ...}``; ``aggregate(n=Count(), ...)`` -> those names."""
    if single is not None and named:
        raise ConfigurationError("pass either one aggregator or named aggregators, not both")
    if single is not None:
        return Named({"value": single})
    return Named(named)
