"""URL query options, declared once per backend and parsed in one place.

A backend (or a store) declares the options its URL reads, each with a name, a kind, a default and a line
of documentation; :meth:`URLOptions.parse` reads the query string once, converts every value by its kind and
refuses an unknown option by name, with a "did you mean". Keyword options given in code override the query
and are taken as they are when they are not strings (a credential object, say).

Kinds: ``str``, ``bool`` (``1/true/yes/on``, ``0/false/no/off``), ``int``, ``float``, ``duration`` (seconds:
``30``, ``2.5``, ``30s``, ``500ms``, ``2m``, ``1h``) and ``any`` (taken as given; a string from the URL).

Example:
    >>> opts = URLOptions("demo", [Option("wait", "duration", 20.0, "long-poll seconds"),
    ...                            Option("create", "bool", True, "create missing queues")])
    >>> opts.parse("wait=500ms&create=off")
    {'wait': 0.5, 'create': False}
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url

__all__ = ["Kind", "Option", "URLOptions", "parse_bool", "parse_duration", "split_query"]

Kind = Literal["str", "bool", "int", "float", "duration", "any"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_EXPECTED: dict[str, str] = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "duration": "seconds, like 30, 2.5, 500ms, 2m or 1h",
}


def parse_bool(value: str | bool) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case) as a bool.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_duration(value: str) -> float:
    """Seconds from ``30``, ``2.5``, ``30s``, ``500ms``, ``2m`` or ``1h``.

    Raises:
        ValueError: anything else.
    """
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _in(url: str | None) -> str:
    """`` in '<url, redacted>'`` for an error message, or nothing without a URL."""
    return "" if url is None else f" in {redact_url(url)!r}"


def _parse_int(value: str) -> int:
    return int(value.strip())


def _parse_float(value: str) -> float:
    return float(value.strip())


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "any": str,
    "bool": parse_bool,
    "int": _parse_int,
    "float": _parse_float,
    "duration": parse_duration,
}


def split_query(query: str) -> dict[str, str]:
    """``a=1&b=2`` as a dict, percent-decoded; the last of repeated names wins; blank values are left out.

    Plain percent-decoding (not ``+`` as space): account keys and SAS tokens contain ``+`` that must survive.
    """
    params: dict[str, str] = {}
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            if value:
                params[unquote(name)] = unquote(value)
            else:
                params.pop(unquote(name), None)
    return params


@dataclass(frozen=True, slots=True)
class Option:
    """One URL option a backend reads.

    Attributes:
        name: the query parameter (and keyword option) name.
        kind: how its text is converted (see the module docstring).
        default: the value when it is not given (documentation; the backend's config applies it).
        doc: one line for the docs table.
        secret: its value never appears in an error message.
    """

    name: str
    kind: Kind
    default: Any
    doc: str
    secret: bool = False

    def convert(self, raw: Any, where: str, url: str | None = None) -> Any:
        """``raw`` from the URL (a string) converted by :attr:`kind`; other values pass unchanged.

        Raises:
            ConfigurationError: the text is not a valid value of the kind, naming the option.
        """
        if not isinstance(raw, str):
            return raw
        try:
            return _CONVERTERS[self.kind](raw)
        except (ValueError, TypeError):
            shown = "***" if self.secret else repr(raw)
            expected = _EXPECTED.get(self.kind, self.kind)
            raise ConfigurationError(
                f"{where} URL parameter {self.name}={shown} is not a valid value (expected {expected}){_in(url)}"
            ) from None


class URLOptions:
    """The options one backend's URL reads; parses a query string against them.

    Args:
        where: what the URL is for, in error messages (``"SQS"``, ``"Azure queue"``).
        options: the declarations.
    """

    def __init__(self, where: str, options: Sequence[Option]) -> None:
        self.where = where
        self.options: dict[str, Option] = {option.name: option for option in options}
        if len(self.options) != len(options):
            raise ValueError(f"{where}: an option is declared twice")

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options.values())

    def defaults(self) -> dict[str, Any]:
        """Every option's default, by name."""
        return {name: option.default for name, option in self.options.items()}

    def parse(
        self,
        query: str | Mapping[str, str],
        overrides: Mapping[str, Any] | None = None,
        *,
        url: str | None = None,
    ) -> dict[str, Any]:
        """The options given in ``query`` or ``overrides`` (which win), converted; defaults are not filled in.

        Args:
            query: the URL's query string (or its already split parameters).
            overrides: keyword options given in code; ``None`` values count as not given.
            url: the whole URL, named (redacted) in error messages.

        Raises:
            ConfigurationError: an unknown option (named, with a "did you mean", the URL and the known ones) or
                a value its kind does not accept.
        """
        given: dict[str, Any] = dict(split_query(query) if isinstance(query, str) else query)
        given.update({name: value for name, value in (overrides or {}).items() if value is not None})
        unknown = sorted(name for name in given if name not in self.options)
        if unknown:
            raise ConfigurationError(self._unknown(unknown, url))
        return {name: self.options[name].convert(raw, self.where, url) for name, raw in given.items()}

    def _unknown(self, names: Sequence[str], url: str | None) -> str:
        described = []
        for name in names:
            hint = difflib.get_close_matches(name, list(self.options), n=1)
            described.append(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        plural = "s" if len(names) > 1 else ""
        return (
            f"unknown {self.where} URL parameter{plural} {', '.join(described)}{_in(url)}; "
            f"known: {', '.join(sorted(self.options)) or 'none'}"
        )

    def table(self) -> str:
        """The options as a Markdown table (name, kind, default, meaning), for the docs."""
        rows = ["| Option | Kind | Default | Meaning |", "|---|---|---|---|"]
        for option in self.options.values():
            default = "" if option.default is None else f"`{option.default!r}`"
            rows.append(f"| `{option.name}` | {option.kind} | {default} | {option.doc} |")
        return "\n".join(rows)
