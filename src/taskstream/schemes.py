"""Scheme tables: a URL's scheme picks a backend class, imported only when it is used.

A factory (``result_store_from_url``, ``state_store_from_url``) keeps one table from URL scheme to
:class:`Backend`, which names the class as ``"module:Class"``. So a base module never imports its backends
(no base <-> backend cycle), a backend whose client library is missing is refused with the ``pip install``
that fixes it, and an unknown scheme is refused with a "did you mean" and the URL without its secrets.

Example:
    >>> table = {"memory": Backend("taskstream.tasks.stores.memory:MemoryResultStore", "memory result store")}
    >>> load_backend(table, "memory://", what="result store", base=object).__name__
    'MemoryResultStore'
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.settings import redact_url

__all__ = ["Backend", "load_backend", "url_scheme"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One row of a scheme table.

    Attributes:
        target: the class, as ``"module:Class"``; imported on first use.
        label: how messages name the backend (``"Redis result store"``).
        extra: the taskstream extra that installs its client library (``None``: it needs none).
        driver: the client library's module, imported first to check the extra (``""``: none).
        package: the client library's pip package, named in the install hint.
    """

    target: str
    label: str
    extra: str | None = None
    driver: str = ""
    package: str = ""


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lowercase (``""`` when it has no ``scheme://``).

    Example:
        >>> url_scheme("Redis://h:6379/0"), url_scheme("results.db")
        ('redis', '')
    """
    return url.split("://", 1)[0].strip().lower() if "://" in url else ""


def load_backend(table: Mapping[str, Backend], url: str, *, what: str, base: type) -> Any:
    """The class that ``url``'s scheme names in ``table``, imported now (callers annotate it as ``type[base]``).

    Args:
        table: scheme -> backend; its order is the order the error message lists the schemes in.
        url: the URL as given (messages show it redacted).
        what: how messages name the kind of URL (``"result store"``).
        base: the class every backend of the table derives from.

    Raises:
        ConfigurationError: the scheme is not in the table (with a "did you mean" when one is close).
        MissingExtraError: the backend's client library is not installed; the message names the ``pip install``.
        TypeError: the table names something that is not a subclass of ``base`` (a bug in the table).
    """
    scheme = url_scheme(url)
    backend = table.get(scheme)
    if backend is None:
        hint = difflib.get_close_matches(scheme, list(table), n=1)
        suggestion = f"; did you mean {hint[0]}://?" if hint else ""
        raise ConfigurationError(
            f"unknown {what} URL scheme {scheme!r} in {redact_url(url)!r}{suggestion} (known: {', '.join(table)})"
        )
    if backend.driver:
        try:
            importlib.import_module(backend.driver)
        except ImportError as exc:
            package = backend.package or backend.driver.split(".")[0]
            raise MissingExtraError(backend.label, backend.extra or package, package) from exc
    module_name, _, class_name = backend.target.partition(":")
    cls: Any = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"the {what} table names {backend.target}, which is not a {base.__name__}")
    return cls
