"""``taskstream queues`` and ``taskstream dlq ...``: queue figures and dead letters from the command line.

=====================================================================  ===============================================
Command                                                                Does
=====================================================================  ===============================================
``taskstream queues [--app mod:app] [QUEUE...]``                       depth, dead-letter queue and depth, in flight
``taskstream dlq list QUEUE [--limit N]``                              dead letters: id, reason, attempts, origin ...
``taskstream dlq show QUEUE MESSAGE_ID``                               headers and original bytes of one
``taskstream dlq replay QUEUE [--id ID ...] [--reason-contains T]``    send matching ones back (``--dry-run``)
``taskstream dlq purge QUEUE [--yes]``                                 empty the dead-letter queue
=====================================================================  ===============================================

Every command takes ``--broker URL`` (default ``TASKSTREAM_BROKER_URL``) and ``--json``; the work is done by
:mod:`taskstream.observe.dlq` and :mod:`taskstream.observe.queues`. On SQS the commands use 1 s long polls
unless the URL sets ``wait_time`` (a closing subscription waits for its long polls to end).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Column, Table

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.errors import ConfigurationError
from taskstream.observe.dlq import (
    DEFAULT_LIST_LIMIT,
    DEFAULT_SCAN,
    ReplayResult,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from taskstream.observe.queues import QueueInfo, app_queues, inspect_queues

__all__ = ["register"]

T = TypeVar("T")

dlq_cli = typer.Typer(name="dlq", help="Dead letters: list, show, replay, purge.", no_args_is_help=True)

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Broker URL (default TASKSTREAM_BROKER_URL).", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
QueueArg = Annotated[str, typer.Argument(help="The queue whose dead letters to use (not the dead-letter queue).")]
DlqOpt = Annotated[
    str | None,
    typer.Option("--dead-letter", help="The dead-letter queue, when it is not the broker's name for QUEUE's."),
]


def _broker_url(url: str | None) -> str:
    url = url or os.environ.get("TASKSTREAM_BROKER_URL")
    if not url:
        raise ConfigurationError("no broker: give --broker URL or set TASKSTREAM_BROKER_URL")
    return url


def _make_broker(url: str) -> Broker:
    """The broker for ``url``; SQS gets 1 s long polls unless the URL says otherwise (closing waits for them)."""
    options: dict[str, Any] = {}
    if url.lower().startswith("sqs://") and "wait_time=" not in url:
        options["wait_time"] = 1
    return broker_from_url(url, **options)


def _quiet_drivers() -> None:
    """Warnings to stderr; the brokers' client libraries as quiet as for ``taskstream run``."""
    from taskstream.cli import QUIET_LOGGERS

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _run(url: str | None, work: Callable[[Broker], Awaitable[T]]) -> T:
    _quiet_drivers()

    async def go() -> T:
        async with _make_broker(_broker_url(url)) as broker:
            return await work(broker)

    return asyncio.run(go())


def _print_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def queues_command(
    queues: Annotated[list[str] | None, typer.Argument(help="Queues to show (besides the app's).")] = None,
    broker: BrokerOpt = None,
    app: Annotated[
        str | None, typer.Option("--app", help="module:app (or module:pipeline) whose queues to show.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show depth, dead-letter queue and depth, and in flight (where the broker says) per queue."""
    from taskstream.cli import load_object

    if broker:
        os.environ["TASKSTREAM_BROKER_URL"] = broker  # read when the module builds its App
    wanted: dict[str, str | None] = app_queues(load_object(app)) if app else {}
    for name in queues or []:
        wanted.setdefault(name, None)
    if not wanted:
        raise ConfigurationError("no queues: name some, or give --app mod:app")
    infos = _run(broker, lambda b: inspect_queues(b, wanted))
    if as_json:
        _print_json([info.as_dict() for info in infos])
        return
    _queues_table(infos)


def _queues_table(infos: list[QueueInfo]) -> None:
    table = Table(
        Column("queue", no_wrap=True),
        "depth",
        "in flight",
        "consumers",
        "dead letters",
        Column("dead-letter queue", no_wrap=True),
    )
    for info in infos:
        table.add_row(
            info.queue,
            _cell(info.depth),
            _cell(info.in_flight),
            _cell(info.consumers),
            _cell(info.dead_letter_depth),
            info.dead_letter,
        )
    console = Console(width=max(100, Console().width))
    console.print(table)
    for info in infos:
        if info.error:
            console.print(f"[yellow]{info.error}[/yellow]", highlight=False)


@dlq_cli.command("list")
def list_command(
    queue: QueueArg,
    broker: BrokerOpt = None,
    limit: Annotated[int, typer.Option(help="Most dead letters to read.", min=1)] = DEFAULT_LIST_LIMIT,
    dead_letter: DlqOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List QUEUE's dead letters (they stay where they are): id, reason, attempts, origin, time, size, preview."""
    letters = _run(broker, lambda b: list_dead_letters(b, queue, limit=limit, dead_letter=dead_letter))
    if as_json:
        _print_json([letter.summary() for letter in letters])
        return
    table = Table(
        Column("message id", no_wrap=True),
        "reason",
        "attempts",
        Column("original queue", no_wrap=True),
        "dead-lettered at",
        "bytes",
        "preview",
    )
    for letter in letters:
        row = letter.summary()
        table.add_row(
            letter.message_id,
            letter.reason or "-",
            _cell(letter.attempts),
            letter.original_queue,
            row["dead_lettered_at"] or "-",
            str(letter.size),
            letter.preview(40),
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    console.print(f"{len(letters)} dead letter(s) of {queue}")


@dlq_cli.command("show")
def show_command(
    queue: QueueArg,
    message_id: Annotated[str, typer.Argument(help="The dead letter's message id (from dlq list).")],
    broker: BrokerOpt = None,
    scan: Annotated[int, typer.Option(help="Most dead letters to look through.", min=1)] = DEFAULT_SCAN,
    dead_letter: DlqOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one dead letter: its headers and original bytes (text when UTF-8 JSON, else base64)."""
    letter = _run(broker, lambda b: get_dead_letter(b, queue, message_id, scan=scan, dead_letter=dead_letter))
    details = letter.details()
    if as_json:
        _print_json(details)
        return
    for name in ("message_id", "original_queue", "reason", "attempts", "dead_lettered_at", "size", "key"):
        typer.echo(f"{name}: {details[name] if details[name] is not None else '-'}")
    typer.echo("headers:")
    for name, value in sorted(details["headers"].items()):
        typer.echo(f"  {name}: {orjson.dumps(value).decode() if not isinstance(value, str) else value}")
    typer.echo(f"body ({details['body_encoding']}, {letter.size} bytes):")
    typer.echo(details["body"])
    if details["body_encoding"] == "base64" and letter.size <= 256:
        typer.echo(f"hex: {letter.body.hex(' ')}")


@dlq_cli.command("replay")
def replay_command(
    queue: QueueArg,
    broker: BrokerOpt = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Replay this message id (repeatable).")] = None,
    reason_contains: Annotated[
        str | None, typer.Option("--reason-contains", help="Replay only reasons containing this (any case).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Replay at most this many.", min=1)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be replayed.")] = False,
    scan: Annotated[int, typer.Option(help="Most dead letters to look through.", min=1)] = DEFAULT_SCAN,
    dead_letter: DlqOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send matching dead letters back to their original queue (bytes and id kept); the rest stay."""
    result = _run(
        broker,
        lambda b: replay_dead_letters(
            b,
            queue,
            ids=ids or None,
            reason_contains=reason_contains,
            limit=limit,
            dry_run=dry_run,
            scan=scan,
            dead_letter=dead_letter,
        ),
    )
    _print_replay(result, as_json)
    if result.failed:
        raise typer.Exit(1)


def _print_replay(result: ReplayResult, as_json: bool) -> None:
    if as_json:
        _print_json(
            {
                "dry_run": result.dry_run,
                "replayed": [letter.summary() for letter in result.replayed],
                "failed": [{**letter.summary(), "error": error} for letter, error in result.failed],
                "kept": result.kept,
            }
        )
        return
    verb = "would replay" if result.dry_run else "replayed"
    for letter in result.replayed:
        typer.echo(f"{verb} {letter.message_id} -> {letter.original_queue} ({letter.reason or 'no reason'})")
    for letter, error in result.failed:
        typer.echo(f"FAILED {letter.message_id} -> {letter.original_queue}: {error}", err=True)
    typer.echo(
        f"{len(result.replayed)} {verb}, {len(result.failed)} failed, {result.kept} left in the dead-letter queue"
    )


@dlq_cli.command("purge")
def purge_command(
    queue: QueueArg,
    broker: BrokerOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    dead_letter: DlqOpt = None,
) -> None:
    """Empty QUEUE's dead-letter queue (asks first unless --yes)."""
    if not yes:
        typer.confirm(f"Delete every dead letter of {queue!r}?", abort=True)
    removed = _run(broker, lambda b: purge_dead_letters(b, queue, dead_letter=dead_letter))
    typer.echo(f"purged the dead-letter queue of {queue} ({removed} message(s) before)")


def register(cli: typer.Typer) -> None:
    """Add ``queues``, ``dlq`` and ``console`` to the ``taskstream`` command."""
    from taskstream.observe.console.cli import console_command

    cli.command("queues")(queues_command)
    cli.add_typer(dlq_cli)
    cli.command("console")(console_command)
