"""The console's pages, JSON endpoints and actions (aiohttp.web handlers).

=========================================================  ===================================================
Route                                                      Serves
=========================================================  ===================================================
``GET /``                                                  queues: depth, rates, dead letters, in flight
``GET /queues/{queue}/dead-letters``                       dead letters with reasons, Replay and Purge
``POST /queues/{queue}/dead-letters/replay``               replay one (``id``), several, or all of them
``POST /queues/{queue}/dead-letters/purge``                empty the dead-letter queue
``GET /tasks``, ``GET /tasks/{task_id}``                   a task by id: status, timings, result or error
``GET /pipelines/{name}``, ``.../graph.svg``               the pipeline graph and live per-stage figures
``GET /api/state``                                         every figure the pages refresh, as JSON
``GET /api/queues/{queue}/dead-letters``                   the dead letters as JSON
``GET /api/tasks/{task_id}``                               a task's record as JSON
``GET /fragments/queues/{queue}/dead-letters``             the dead-letter rows (the page swaps them in)
=========================================================  ===================================================
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from taskstream.errors import QueueNotFound, TaskstreamError
from taskstream.observe.console.graph import stage_figures
from taskstream.observe.console.state import STATE, ConsoleState
from taskstream.observe.dlq import DeadLetter, list_dead_letters, purge_dead_letters, replay_dead_letters

__all__ = ["routes"]

log = logging.getLogger("taskstream.observe.console")

READ_WAIT = 2.0
"""Seconds a listing waits for the next dead letter while fewer than the queue's depth arrived."""
MAX_ID_LENGTH = 256
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}

routes = web.RouteTableDef()


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json")


def _known_queue(state: ConsoleState, request: web.Request) -> str:
    queue = request.match_info["queue"]
    if queue not in state.config.queues:
        known = ", ".join(sorted(state.config.queues))
        raise web.HTTPNotFound(text=f"the console does not show a queue named {queue!r}; it shows: {known}")
    return queue


def _dead_letters_path(queue: str) -> str:
    return f"/queues/{quote(queue, safe='')}/dead-letters"


@routes.get("/")
async def queues_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snapshot = state.sampler.snapshot()
    return state.render("queues.html", title="Queues", page="queues", snapshot=snapshot)


@routes.get("/api/state")
async def api_state(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snapshot = state.sampler.snapshot()
    steps = state.sampler.step_rates()
    snapshot["pipelines"] = {
        name: stage_figures(view, snapshot["queues"], steps) for name, view in state.pipelines.items()
    }
    return _json(snapshot)


async def _read_letters(state: ConsoleState, queue: str) -> tuple[list[DeadLetter], str | None]:
    """The first dead letters of ``queue`` (they stay where they are), or why there are none to show."""
    async with state.lock:
        try:
            letters = await list_dead_letters(
                state.actions,
                queue,
                limit=state.config.dead_letter_limit,
                dead_letter=state.config.queues[queue],
                wait=READ_WAIT,
            )
        except QueueNotFound:
            return [], "Nothing was dead-lettered here yet: the dead-letter queue does not exist."
        except TaskstreamError as exc:
            return [], state.config.scrub(f"cannot read the dead letters: {exc}")
    return letters, None


def _letter_rows(letters: list[DeadLetter]) -> list[dict[str, Any]]:
    rows = []
    for letter in letters:
        details = letter.details()
        details["header_lines"] = [
            (name, value if isinstance(value, str) else orjson.dumps(value).decode())
            for name, value in sorted(details["headers"].items())
        ]
        rows.append(details)
    return rows


@routes.get("/queues/{queue}/dead-letters")
async def dead_letters_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    queue = _known_queue(state, request)
    letters, note = await _read_letters(state, queue)
    return state.render(
        "dead_letters.html",
        title=f"Dead letters of {queue}",
        page="dead-letters",
        queue=queue,
        figures=state.sampler.queue_state(queue),
        letters=_letter_rows(letters),
        note=note,
        flash=state.flash.pop(queue, None),
        limit=state.config.dead_letter_limit,
    )


@routes.get("/fragments/queues/{queue}/dead-letters")
async def dead_letters_fragment(request: web.Request) -> web.Response:
    state = request.app[STATE]
    queue = _known_queue(state, request)
    letters, note = await _read_letters(state, queue)
    html = state.templates.get_template("_dead_letter_rows.html").render(
        queue=queue, letters=_letter_rows(letters), note=note, limit=state.config.dead_letter_limit
    )
    return web.Response(text=html, content_type="text/html", headers={"X-Dead-Letters": str(len(letters))})


@routes.get("/api/queues/{queue}/dead-letters")
async def api_dead_letters(request: web.Request) -> web.Response:
    state = request.app[STATE]
    queue = _known_queue(state, request)
    letters, note = await _read_letters(state, queue)
    return _json({"queue": queue, "note": note, "dead_letters": [letter.details() for letter in letters]})


def _ids(values: list[str]) -> list[str]:
    for value in values:
        if not value or len(value) > MAX_ID_LENGTH:
            raise web.HTTPBadRequest(text=f"bad message id {value[:40]!r}: empty or over {MAX_ID_LENGTH} characters")
    return values


@routes.post("/queues/{queue}/dead-letters/replay")
async def replay(request: web.Request) -> web.Response:
    state = request.app[STATE]
    queue = _known_queue(state, request)
    form = await request.post()
    ids = _ids([str(v) for v in form.getall("id", [])])
    async with state.lock:
        try:
            result = await replay_dead_letters(
                state.actions, queue, ids=ids or None, dead_letter=state.config.queues[queue], wait=READ_WAIT
            )
        except TaskstreamError as exc:
            state.flash[queue] = state.config.scrub(f"Replay failed: {exc}")
        else:
            text = f"Replayed {len(result.replayed)} dead letter(s) to their original queue"
            if result.failed:
                first = state.config.scrub(result.failed[0][1])
                text += f"; {len(result.failed)} failed (they stay dead-lettered): {first}"
            elif ids and not result.replayed:
                text = "No dead letter with that id any more (replayed or purged meanwhile?)"
            state.flash[queue] = f"{text}."
            log.info("console: %s (%s)", text, queue)
    state.sampler.poke()
    raise web.HTTPSeeOther(_dead_letters_path(queue))


@routes.post("/queues/{queue}/dead-letters/purge")
async def purge(request: web.Request) -> web.Response:
    state = request.app[STATE]
    queue = _known_queue(state, request)
    async with state.lock:
        try:
            removed = await purge_dead_letters(state.actions, queue, dead_letter=state.config.queues[queue])
        except QueueNotFound:
            state.flash[queue] = "Nothing to purge: the dead-letter queue does not exist."
        except TaskstreamError as exc:
            state.flash[queue] = state.config.scrub(f"Purge failed: {exc}")
        else:
            state.flash[queue] = f"Purged the dead-letter queue ({removed} message(s) before)."
            log.info("console: purged the dead-letter queue of %s (%d message(s))", queue, removed)
    state.sampler.poke()
    raise web.HTTPSeeOther(_dead_letters_path(queue))


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"].strip()
    if not task_id or len(task_id) > MAX_ID_LENGTH:
        raise web.HTTPBadRequest(text=f"bad task id: empty or over {MAX_ID_LENGTH} characters")
    return task_id


async def _task_record(state: ConsoleState, task_id: str) -> tuple[dict[str, Any] | None, str | None]:
    if state.store is None:
        return None, state.store_error
    try:
        info = await asyncio.to_thread(state.store.get, task_id)
    except Exception as exc:
        return None, state.config.scrub(f"cannot read the result store: {type(exc).__name__}: {exc}")
    if info is None:
        return None, f"No task {task_id!r} in the result store (never submitted there, or expired)."
    record = info.as_dict()
    record["done"] = info.done
    record["waited"] = _between(info.submitted_at, info.started_at)
    record["ran"] = _between(info.started_at, info.finished_at)
    record["result_text"] = orjson.dumps(info.result, option=orjson.OPT_INDENT_2, default=str).decode()
    return record, None


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


@routes.get("/tasks")
async def tasks_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    wanted = request.query.get("id", "").strip()
    if wanted:
        raise web.HTTPSeeOther(f"/tasks/{quote(wanted, safe='')}")
    return state.render(
        "tasks.html", title="Tasks", page="tasks", task=None, note=state.store_error, recent=list(state.recent_tasks)
    )


@routes.get("/tasks/{task_id}")
async def task_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    task_id = _task_id(request)
    record, note = await _task_record(state, task_id)
    if record is not None:
        state.remember_task(task_id)
    return state.render(
        "tasks.html",
        title=f"Task {task_id}",
        page="tasks",
        task_id=task_id,
        task=record,
        note=note,
        recent=list(state.recent_tasks),
    )


@routes.get("/api/tasks/{task_id}")
async def api_task(request: web.Request) -> web.Response:
    state = request.app[STATE]
    record, note = await _task_record(state, _task_id(request))
    return _json(record) if record is not None else _json({"error": note}, status=404)


def _pipeline(state: ConsoleState, request: web.Request) -> Any:
    name = request.match_info["name"]
    view = state.pipelines.get(name)
    if view is None:
        known = ", ".join(state.pipelines) or "none"
        raise web.HTTPNotFound(text=f"the console shows no pipeline named {name!r}; it shows: {known}")
    return view


@routes.get("/pipelines/{name}")
async def pipeline_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    view = _pipeline(state, request)
    _svg, svg_error = await view.svg()
    snapshot = state.sampler.snapshot()
    return state.render(
        "pipeline.html",
        title=f"Pipeline {view.name}",
        page="pipeline",
        view=view,
        figures=stage_figures(view, snapshot["queues"], state.sampler.step_rates()),
        dead_letter_figures=_dead_letter_figures(state, view.dead_letter),
        svg_error=svg_error,
        describe=view.plan.describe(),
    )


def _dead_letter_figures(state: ConsoleState, dead_letter: str) -> dict[str, Any] | None:
    """The figures of the first queue whose dead-letter queue is ``dead_letter`` (a pipeline's shared one)."""
    for queue in state.config.queues:
        if state.sampler.dead_letter(queue) == dead_letter:
            return state.sampler.queue_state(queue)
    return None


@routes.get("/pipelines/{name}/graph.svg")
async def pipeline_graph(request: web.Request) -> web.Response:
    view = _pipeline(request.app[STATE], request)
    svg, error = await view.svg()
    if svg is None:
        raise web.HTTPNotFound(text=f"no drawing of pipeline {view.name!r}: {error}")
    return web.Response(body=svg, content_type="image/svg+xml")


@routes.get("/favicon.ico")
async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


@routes.get("/static/{name}")
async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    data = importlib.resources.files("taskstream.observe.console").joinpath("static", name).read_bytes()
    return web.Response(body=data, content_type=STATIC[name], headers={"Cache-Control": "no-cache"})
