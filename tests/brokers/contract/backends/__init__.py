"""One module per backend, each defining ``SPEC = BackendSpec(...)``; the contract suite finds them all.

A new backend adds a module here and nothing else: the whole contract suite then runs against it under its
pytest marker (``pytest -m <marker>``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from taskstream.brokers.base import Broker

__all__ = ["BackendSpec", "all_specs"]


@dataclass(frozen=True)
class BackendSpec:
    """How the contract suite reaches one backend.

    Attributes:
        name: pytest id and marker name.
        make: builds an unconnected broker. Brokers from one ``make`` share queues (same server or hub).
            ``visibility_timeout`` (seconds) is given by tests that need a short one; ``None`` = default.
        queue_name: turns a unique stem into a valid queue name for this backend.
        setup: optional async callable run once per test before brokers are made (start a device, check
            the server is reachable and fail with a clear message when it is not).
        url: the URL another process gives ``broker_from_url`` to reach the same queues as ``make``'s brokers,
            with ``visibility_timeout`` as ``make`` takes it; ``None`` where no other process can
            (``Capabilities.in_process``).
    """

    name: str
    make: Callable[..., Broker]
    queue_name: Callable[[str], str] = field(default=lambda stem: stem)
    setup: Callable[[], Awaitable[None]] | None = None
    url: Callable[..., str] | None = None


def all_specs() -> list[BackendSpec]:
    specs = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, BackendSpec):
            specs.append(spec)
    return specs
