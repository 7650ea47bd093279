"""Command-line options several ``taskstream`` verbs share, declared once (typer ``Annotated`` types)."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["BrokerOpt", "HealthHostOpt", "HealthPortOpt", "VerboseOpt"]

BrokerOpt = Annotated[str | None, typer.Option(help="Broker URL (overrides TASKSTREAM_BROKER_URL).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]
HealthPortOpt = Annotated[
    int | None,
    typer.Option(
        envvar="TASKSTREAM_HEALTH_PORT", help="Serve /healthz, /readyz and /metrics on this port (metrics on)."
    ),
]
HealthHostOpt = Annotated[str, typer.Option(envvar="TASKSTREAM_HEALTH_HOST")]
