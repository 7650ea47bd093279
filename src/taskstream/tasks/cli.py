"""``taskstream worker``, ``taskstream submit`` and ``taskstream status``.

* ``taskstream worker module:app --queues a,b --concurrency N --processes P`` serves the App's task queues
  until SIGTERM/SIGINT (running calls finish or are requeued). ``--autoscale MIN:MAX`` instead of
  ``--processes`` grows the worker-process pool while calls wait or the queue is deep and stops processes
  idle for ``--idle-timeout`` seconds. ``cpu_bound`` tasks run in those processes; others on the loop or
  threads.
* ``taskstream submit NAME [ARG ...] --queue Q [--kwarg k=v] [--wait]`` sends a call by name (arguments are
  JSON when they parse as JSON, else strings) and prints its task id; ``--wait`` also waits and prints the
  result as JSON.
* ``taskstream status TASK_ID`` prints the task's record from the result store (``--json`` for machines).

Broker and result store come from ``--broker``/``--result-store`` or ``TASKSTREAM_BROKER_URL`` and
``TASKSTREAM_RESULT_STORE_URL``; on real brokers the default store is the host's SQLite file, which is
what lets ``status`` answer for tasks that other processes submitted.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from taskstream.cli_options import BrokerOpt, HealthHostOpt, HealthPortOpt, VerboseOpt
from taskstream.config_check import setting
from taskstream.errors import ConfigurationError
from taskstream.settings import Settings, env_name

if TYPE_CHECKING:
    from taskstream.app import App

__all__ = ["parse_autoscale", "register"]


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> ``(MIN, MAX)``, with a clear error for anything else."""
    low, sep, high = value.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(low), int(high)
    except ValueError:
        raise ConfigurationError(f"--autoscale takes MIN:MAX (two whole numbers), got {value!r}") from None
    if lo < 0 or hi < 1 or lo > hi:
        raise ConfigurationError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {value!r}")
    return lo, hi


def _set_env(broker: str | None, result_store: str | None) -> None:
    # Read by the App the target module builds when it is imported.
    if broker:
        os.environ["TASKSTREAM_BROKER_URL"] = broker
    if result_store:
        os.environ["TASKSTREAM_RESULT_STORE_URL"] = result_store


def worker(
    target: Annotated[str, typer.Argument(help="module:app whose tasks to serve, e.g. examples.endpoint:app")],
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="Comma-separated queues (default: every task's queue).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Calls running at once (async, threads, processes).")] = 16,
    processes: Annotated[
        int | None, typer.Option(help="Worker processes for cpu_bound tasks (default: the cores, if any).")
    ] = None,
    autoscale: Annotated[
        str | None, typer.Option(help="MIN:MAX worker processes, grown while the queue is deep.")
    ] = None,
    idle_timeout: Annotated[float, typer.Option(help="Seconds before an idle worker process stops.")] = 30.0,
    broker: BrokerOpt = None,
    result_store: Annotated[str | None, typer.Option(help="Result store URL.")] = None,
    verbose: VerboseOpt = False,
    health_port: HealthPortOpt = None,
    health_host: HealthHostOpt = "0.0.0.0",
) -> None:
    """Serve an App's task queues until SIGTERM or SIGINT (running calls finish or are requeued)."""
    from taskstream.app import App
    from taskstream.cli import _setup_logging, load_object
    from taskstream.tasks.worker import WorkerConfig

    _setup_logging(verbose)
    _check_worker_options(processes, autoscale, concurrency)
    _set_env(broker, result_store)
    app = load_object(target)
    if not isinstance(app, App):
        raise ConfigurationError(f"{target!r} is a {type(app).__name__}, not a taskstream App")
    asyncio.run(app.check_configuration())  # a bad store URL stops here, before the worker announces itself
    served = tuple(q.strip() for q in queues.split(",") if q.strip()) if queues else None
    low, high = _process_range(app, served, processes, autoscale)
    app.tasks.enable_worker(
        WorkerConfig(
            queues=served,
            concurrency=concurrency,
            min_processes=low,
            max_processes=high,
            idle_timeout=idle_timeout,
            shutdown_grace=app.settings.shutdown_grace,
        )
    )
    if app.broker.capabilities.in_process:
        typer.echo(
            f"taskstream worker: warning: {app.broker_url} is the in-process memory broker, which no other "
            "process can reach (taskstream submit cannot); use --broker or TASKSTREAM_BROKER_URL",
            err=True,
        )
    typer.echo(
        f"taskstream worker: {target} on {app.broker_url}, queues "
        f"{', '.join(served or app.tasks.task_queues()) or '(none)'}, processes {low}..{high}",
        err=True,
    )
    if health_port is None:
        app.run()
    else:
        from taskstream.health import serve_with_health

        app.enable_metrics()
        asyncio.run(serve_with_health(app, health_port, health_host))
        if app.failure is not None:
            raise SystemExit(1)


def _check_worker_options(processes: int | None, autoscale: str | None, concurrency: int) -> None:
    if processes is not None and autoscale is not None:
        raise ConfigurationError("give either --processes or --autoscale, not both")
    if processes is not None and processes < 0:
        raise ConfigurationError(f"--processes must not be negative, got {processes}")
    if concurrency < 1:
        raise ConfigurationError(f"--concurrency must be at least 1, got {concurrency}")


def _process_range(
    app: App, served: tuple[str, ...] | None, processes: int | None, autoscale: str | None
) -> tuple[int, int]:
    """``(min, max)`` worker processes: ``--autoscale``, ``--processes``, or the cores if cpu_bound tasks are served."""
    if autoscale is not None:
        return parse_autoscale(autoscale)
    wanted = set(served) if served else None
    has_cpu = any(
        t.options.cpu_bound and (wanted is None or t.options.queue in wanted) for t in app.tasks.registry.values()
    )
    count = processes if processes is not None else ((os.cpu_count() or 1) if has_cpu else 0)
    return count, max(1, count)


def _parse_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def submit(
    task: Annotated[str, typer.Argument(help="Task name as the workers registered it.")],
    args: Annotated[list[str] | None, typer.Argument(help="Positional arguments (JSON, else strings).")] = None,
    queue: Annotated[str, typer.Option("--queue", "-q", help="Queue the workers serve.")] = "tasks",
    kwarg: Annotated[list[str] | None, typer.Option("--kwarg", "-k", help="Keyword argument name=value.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait with --wait.")] = None,
    broker: BrokerOpt = None,
    result_store: Annotated[str | None, typer.Option(help="Result store URL.")] = None,
) -> None:
    """Submit one call by name; print its task id (and with --wait, its result as JSON)."""
    from taskstream.app import App

    _set_env(broker, result_store)
    positional = [_parse_value(a) for a in args or []]
    keywords: dict[str, Any] = {}
    for item in kwarg or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--kwarg takes name=value, got {item!r}")
        keywords[name] = _parse_value(value)
    app = App(workers=False)
    if app.broker.capabilities.in_process:
        raise ConfigurationError(
            f"taskstream submit needs a real broker: {app.broker_url} lives inside this one process, so no "
            "worker can ever take the call; give --broker URL or set TASKSTREAM_BROKER_URL "
            "(e.g. amqp://guest:guest@127.0.0.1:5672/), the same the worker uses"
        )
    handle = app.remote(task, queue=queue)
    if not wait:
        task_id = asyncio.run(_send(app, handle, positional, keywords))
        typer.echo(task_id)
        return
    with app:
        future = handle.submit(*positional, **keywords)
        typer.echo(future.task_id)
        try:
            value = future.result(timeout)
        except TimeoutError:
            typer.echo(f"taskstream: no result within {timeout} s (ask: taskstream status {future.task_id})", err=True)
            raise typer.Exit(3) from None
        except Exception as exc:
            typer.echo(f"taskstream: task failed: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(orjson.dumps(value).decode())


async def _send(app: Any, handle: Any, args: list[Any], kwargs: dict[str, Any]) -> str:
    async with app:
        task_id: str = await app.tasks.client.send_without_reply(handle, args, kwargs)
        return task_id


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="milliseconds")


def status(
    task_id: Annotated[str, typer.Argument(help="The id submit printed.")],
    result_store: Annotated[str | None, typer.Option(help="Result store URL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as one JSON object.")] = False,
) -> None:
    """Print a task's status, timestamps and result (or error) from the result store."""
    from taskstream.tasks.errors import TaskNotFound
    from taskstream.tasks.stores.base import default_sqlite_path, result_store_from_url

    settings = Settings()
    url = result_store or (
        settings.result_store_url.get_secret_value()
        if settings.result_store_url is not None
        else f"sqlite:///{default_sqlite_path()}"
    )
    with setting("--result-store" if result_store else env_name("result_store_url")):
        store = result_store_from_url(url, ttl=settings.result_ttl)
    info = store.get(task_id)
    if info is None:
        raise TaskNotFound(f"no task {task_id!r} in {store!r} (never submitted there, or expired)")
    if as_json:
        typer.echo(orjson.dumps(info.as_dict()).decode())
        return
    typer.echo(f"task      {info.task_id}")
    typer.echo(f"name      {info.name}  (queue {info.queue or '-'})")
    typer.echo(f"status    {info.status}")
    typer.echo(f"submitted {_when(info.submitted_at)}")
    typer.echo(f"started   {_when(info.started_at)}")
    typer.echo(f"finished  {_when(info.finished_at)}")
    typer.echo(f"attempts  {info.attempts}  worker {info.worker or '-'}")
    if info.status == "success":
        typer.echo(f"result    {orjson.dumps(info.result).decode()}")
    elif info.error:
        typer.echo(f"error     {info.error.get('type')}: {info.error.get('message')}")
        if info.error.get("traceback"):
            typer.echo(info.error["traceback"].rstrip())


def register(cli: typer.Typer) -> None:
    """Add ``worker``, ``submit`` and ``status`` to the ``taskstream`` command."""
    cli.command("worker")(worker)
    cli.command("submit")(submit)
    cli.command("status")(status)
