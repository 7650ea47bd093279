"""The ``taskstream`` command line (typer).

Core verbs live here (``demo``, ``run``, ``version``). Feature packages add theirs: each module listed in
``EXTENSIONS`` defines ``register(cli: typer.Typer) -> None`` and is imported only if it exists, so a verb
appears when its feature lands and the core stays small.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Annotated, Any

import typer

from taskstream.cli_options import BrokerOpt, HealthHostOpt, HealthPortOpt, VerboseOpt
from taskstream.errors import ConfigurationError, TaskstreamError

__all__ = ["EXTENSIONS", "cli", "load_object", "main"]

cli = typer.Typer(
    name="taskstream",
    help="Run Python functions as async consumers over message brokers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXTENSIONS = (
    "taskstream.tasks.cli",
    "taskstream.stream_ops.cli",
    "taskstream.brokers.zeromq.cli",
    "taskstream.deploy",
    "taskstream.payloads.cli",
    "taskstream.observe.cli",
)


def load_object(target: str) -> Any:
    """Import ``module:attribute`` (``module`` alone is also tried as ``module:app``).

    Raises:
        ConfigurationError: the module or attribute does not exist; the message says which.
    """
    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
        raise
    obj = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj


#: Driver loggers kept quiet unless ``--verbose``: per-request HTTP logs (Azure's SDK logs every request and
#: response at INFO) and reconnect chatter (several lines per attempt while a broker is down). taskstream logs
#: the events that matter itself: connection lost, restored, given up; receive failing and working again.
QUIET_LOGGERS: dict[str, int] = {
    "azure": logging.WARNING,
    "azure.core.pipeline.policies.http_logging_policy": logging.WARNING,
    "aiobotocore": logging.WARNING,
    "botocore": logging.WARNING,
    "aio_pika": logging.CRITICAL,
    "aiormq": logging.CRITICAL,
}


def _setup_logging(verbose: bool) -> None:
    """Log to stderr: taskstream at INFO (DEBUG with ``verbose``), the brokers' client libraries quieter."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


@cli.command()
def version() -> None:
    """Print the taskstream version."""
    from taskstream import __version__

    typer.echo(__version__)


@cli.command()
def demo(
    broker: Annotated[str, typer.Option(help="Broker URL; the embedded memory broker by default.")] = "memory://",
) -> None:
    """Run the showcase on the embedded memory broker: consumers, task futures and a stream pipeline."""
    import asyncio

    from taskstream.demo import run_demo

    asyncio.run(run_demo(broker))


@cli.command()
def run(
    target: Annotated[str, typer.Argument(help="module:app, e.g. examples.two_stage:app")],
    broker: BrokerOpt = None,
    verbose: VerboseOpt = False,
    health_port: HealthPortOpt = None,
    health_host: HealthHostOpt = "0.0.0.0",
) -> None:
    """Run an App's consumers until SIGTERM or SIGINT, then stop cleanly (exit 0)."""
    import asyncio
    import os

    from taskstream.app import App

    _setup_logging(verbose)
    if broker:
        os.environ["TASKSTREAM_BROKER_URL"] = broker  # read when the module builds its App
    app = load_object(target)
    if not isinstance(app, App):
        raise ConfigurationError(f"{target!r} is a {type(app).__name__}, not a taskstream App")
    asyncio.run(app.check_configuration())  # bad store URLs stop here, named by their setting
    if health_port is None:
        app.run()
    else:
        from taskstream.health import serve_with_health

        app.enable_metrics()
        asyncio.run(serve_with_health(app, health_port, health_host))
        if app.failure is not None:
            raise SystemExit(1)


def _register_extensions() -> None:
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that feature is not part of this build
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(cli)


def main() -> None:
    """Entry point of the ``taskstream`` script: taskstream errors print one clear line, exit 2."""
    _register_extensions()
    try:
        cli()
    except TaskstreamError as exc:
        typer.echo(f"taskstream: error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
