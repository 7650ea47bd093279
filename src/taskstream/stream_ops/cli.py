"""``taskstream pipeline ...``: run a pipeline fused or one stage replica, draw it, list its stages, stop it.

=================================================================  ==================================================
Command                                                            Does
=================================================================  ==================================================
``taskstream pipeline run module:pipeline``                         runs every step in this process on the broker
``taskstream pipeline run module:pipeline --stage S --replica I``   runs replica I of stage S (one per VM/service)
``taskstream pipeline graph module:pipeline -o graph.svg``          draws stages and queues (``.svg`` or ``.png``)
``taskstream pipeline stages module:pipeline``                      prints stages, steps, replicas and queues
``taskstream pipeline stop QUEUE``                                  puts a ``Stop`` control message on QUEUE
``taskstream pipeline rescale module:pipeline --stage S --from N``  moves stage S from N replicas to the
                                                                   pipeline's parallelism (pipeline stopped)
=================================================================  ==================================================

``module:pipeline`` names a :class:`Pipeline` or a function without arguments that returns one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Annotated, Any

import typer

from taskstream.cli_options import BrokerOpt, HealthHostOpt, HealthPortOpt, VerboseOpt
from taskstream.errors import ConfigurationError

__all__ = ["load_pipeline", "register"]

pipeline_cli = typer.Typer(
    name="pipeline", help="Stream pipelines: run fused or by stage, draw, stop.", no_args_is_help=True
)


def load_pipeline(target: str) -> Any:
    """Import ``module:attribute`` and return the Pipeline it names (calling a factory if needed)."""
    from taskstream.cli import load_object
    from taskstream.stream_ops.pipeline import Pipeline

    obj = load_object(target if ":" in target else f"{target}:pipeline")
    if not isinstance(obj, Pipeline) and callable(obj):
        obj = obj()
    if not isinstance(obj, Pipeline):
        raise ConfigurationError(f"{target!r} is a {type(obj).__name__}, not a taskstream Pipeline")
    return obj


async def _run_until_signal(coro: Any) -> Any:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        typer.echo("stopped by signal: unacked input returns to its queue", err=True)
        return None


@pipeline_cli.command("run")
def run_command(
    target: Annotated[str, typer.Argument(help="module:pipeline")],
    stage: Annotated[str | None, typer.Option(help="Run only this stage (one replica of it).")] = None,
    replica: Annotated[int, typer.Option(help="Replica index within the stage.")] = 0,
    broker: BrokerOpt = None,
    state: Annotated[
        str | None, typer.Option(help="State store URL for snapshots (sqlite:///path, redis://...).")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Forget this replica's snapshot (a new run, not a restart).")] = False,
    batch_size: Annotated[int, typer.Option(help="Items processed together.")] = 1024,  # RunConfig.batch_size
    verbose: VerboseOpt = False,
    health_port: HealthPortOpt = None,
    health_host: HealthHostOpt = "0.0.0.0",
) -> None:
    """Run a pipeline fused in this process, or one replica of one stage."""
    from taskstream.cli import _setup_logging
    from taskstream.config_check import check_broker_url, claim_check_from_settings, open_state_store
    from taskstream.settings import Settings, env_name
    from taskstream.stream_ops.runner import RunConfig

    _setup_logging(verbose)
    if broker:
        os.environ["TASKSTREAM_BROKER_URL"] = broker
    if replica and stage is None:
        raise ConfigurationError("--replica needs --stage")
    pipeline = load_pipeline(target)
    config = RunConfig(batch_size=batch_size, fresh=fresh)
    # Every URL is checked before anything runs; an error names its setting (or option).
    settings = Settings()
    bus = check_broker_url(broker, name="--broker" if broker else env_name("broker_url"))
    claim_check = claim_check_from_settings(settings)
    store = None if stage is None else open_state_store(state, settings, name="--state" if state else None)
    work = _run(pipeline, stage, replica, bus, store, config=config, claim_check=claim_check)
    if health_port is not None:
        from taskstream.health import run_with_health

        name = f"stage {stage!r} replica {replica}" if stage is not None else "the pipeline"
        work = run_with_health(work, port=health_port, host=health_host, broker=bus, name=name)
    result = asyncio.run(_run_until_signal(work))
    if result is not None:
        typer.echo(result.summary())


async def _run(pipeline: Any, stage: str | None, replica: int, broker: Any, store: Any, **options: Any) -> Any:
    """Run fused (``stage=None``) or one replica of one stage; close the broker and store this process built."""
    try:
        if stage is None:
            return await pipeline.run(broker, **options)
        return await pipeline.run_stage(stage, replica, broker=broker, store=store, **options)
    finally:
        await broker.close()
        if store is not None:
            await store.close()


@pipeline_cli.command("graph")
def graph_command(
    target: Annotated[str, typer.Argument(help="module:pipeline")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output file, .svg or .png.")] = "pipeline.svg",
    dot: Annotated[bool, typer.Option(help="Print Graphviz dot instead of drawing.")] = False,
) -> None:
    """Draw a pipeline's stages, steps and queues."""
    from taskstream.stream_ops.drawing import draw_plan, to_dot

    plan = load_pipeline(target).plan()
    if dot:
        typer.echo(to_dot(plan))
        return
    draw_plan(plan, output)
    typer.echo(f"wrote {output}")


@pipeline_cli.command("stages")
def stages_command(target: Annotated[str, typer.Argument(help="module:pipeline")]) -> None:
    """Print the stages (what each VM or service runs), their steps and queues."""
    typer.echo(load_pipeline(target).plan().describe())


@pipeline_cli.command("stop")
def stop_command(
    queue: Annotated[str, typer.Argument(help="The queue of the component to stop.")],
    broker: BrokerOpt = None,
    key: Annotated[str | None, typer.Option(help="Message group (FIFO queues).")] = None,
) -> None:
    """Put a Stop control message on QUEUE; the component consuming it ends cleanly."""
    from taskstream.config_check import check_broker_url
    from taskstream.settings import env_name
    from taskstream.stream_ops.wire import send_stop

    bus = check_broker_url(broker, name="--broker" if broker else env_name("broker_url"))

    async def go() -> None:
        async with bus as b:
            await b.declare(queue, fifo=queue.endswith(".fifo"))
            await send_stop(b, queue, key=key)

    asyncio.run(go())
    typer.echo(f"sent Stop to {queue}")


@pipeline_cli.command("rescale")
def rescale_command(
    target: Annotated[str, typer.Argument(help="module:pipeline, declaring the new parallelism")],
    stage: Annotated[str, typer.Option(help="The stage whose parallelism changes.")],
    old: Annotated[int, typer.Option("--from", help="How many replicas the stage ran with.")],
    broker: BrokerOpt = None,
    state: Annotated[str | None, typer.Option(help="State store URL of the snapshots (sqlite:///path, ...).")] = None,
) -> None:
    """Move a stopped pipeline's stage to its new parallelism: state and queued records go to the new owners."""
    from taskstream.config_check import check_broker_url, open_state_store
    from taskstream.settings import Settings, env_name
    from taskstream.stream_ops.rescale import rescale_stage

    if broker:
        os.environ["TASKSTREAM_BROKER_URL"] = broker
    pipeline = load_pipeline(target)
    bus = check_broker_url(broker, name="--broker" if broker else env_name("broker_url"))
    store = open_state_store(state, Settings(), name="--state" if state else None)

    async def go() -> str:
        try:
            async with bus as b:
                return (await rescale_stage(pipeline, stage, old, broker=b, store=store)).summary()
        finally:
            await store.close()

    typer.echo(asyncio.run(go()))


def register(cli: typer.Typer) -> None:
    """Add the ``pipeline`` verbs to the ``taskstream`` command."""
    cli.add_typer(pipeline_cli, name="pipeline")
