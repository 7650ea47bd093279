"""The options a ``redis://`` URL may carry, checked with :mod:`taskstream.urloptions` before redis-py reads it.

redis-py hands every query parameter it does not parse itself to its connection classes, so a mistyped one
(``?socket_timout=5``) only fails at the first command, or never. The options accepted here are the ones the
installed redis-py reads: its URL parsers and the keyword parameters of its connection classes (sync and
asyncio), read from their signatures so that a newer redis-py's options pass without a change here.

Example:
    >>> check_redis_url("redis://127.0.0.1:6379/0?socket_timeout=5", "Redis result store")
    >>> check_redis_url("redis://127.0.0.1:6379/0?socket_timout=5", "Redis result store")
    Traceback (most recent call last):
    ...
    taskstream.errors.ConfigurationError: unknown Redis result store URL parameter 'socket_timout' (did you mean ...
"""

from __future__ import annotations

import functools
import inspect
from urllib.parse import urlsplit

from taskstream.urloptions import Option, URLOptions

__all__ = ["check_redis_url", "redis_url_options"]

_KEYWORDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _parameters(cls: type) -> set[str]:
    return {p.name for p in inspect.signature(cls).parameters.values() if p.kind in _KEYWORDS}


@functools.cache
def redis_url_options(where: str) -> URLOptions:
    """The URL options the installed redis-py accepts, named ``where`` in error messages.

    Raises:
        ImportError: redis-py is not installed (callers check for the extra first).
    """
    import redis.asyncio.connection as async_connection
    import redis.connection as sync_connection

    names = set(sync_connection.URL_QUERY_ARGUMENT_PARSERS)
    for module in (sync_connection, async_connection):
        for cls in (
            module.AbstractConnection,
            module.Connection,
            module.SSLConnection,
            module.UnixDomainSocketConnection,
        ):
            names |= _parameters(cls)
    return URLOptions(where, [Option(name, "str", None, "redis-py connection option") for name in sorted(names)])


def check_redis_url(url: str, where: str) -> None:
    """Refuse an option of ``url``'s query string that redis-py does not read.

    Raises:
        ConfigurationError: the option, named with a "did you mean" and the redacted URL.
    """
    redis_url_options(where).parse(urlsplit(url).query, url=url)
