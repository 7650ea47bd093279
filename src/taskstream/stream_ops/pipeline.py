"""``Pipeline``: declare sources, operators and sinks; run fused, one stage replica, or every stage.

Example:
    >>> from taskstream.stream_ops import Pipeline
    >>> p = Pipeline("doc-squares")
    >>> out = p.source("numbers", range(5)).map(lambda n: n * n).filter(lambda n: n % 2 == 0).collect()
    >>> result = p.run_sync()
    >>> out
    [0, 4, 16]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.errors import ConfigurationError
from taskstream.payloads.claimcheck import ClaimCheck
from taskstream.settings import Settings
from taskstream.stream_ops.core import Graph, SourceNode, check_name
from taskstream.stream_ops.plan import Plan, compile_plan
from taskstream.stream_ops.runner import RunConfig, Runner, RunResult
from taskstream.stream_ops.sources.iterables import as_source
from taskstream.stream_ops.state import MemoryStateStore, StateStore, state_store_from_url
from taskstream.stream_ops.stream import Stream

if TYPE_CHECKING:
    from taskstream.app import App
    from taskstream.context import AppContext

__all__ = ["Pipeline", "PipelineComponent", "StageSpec"]

log = logging.getLogger("taskstream.stream_ops")


class StageSpec:
    """Settings of one stage: ``pipeline.stage("windows").parallelism(3).bounded(idle_timeout=30)``."""

    def __init__(self, name: str) -> None:
        self.name = check_name("stage", name)
        self.replicas = 1
        self.max_messages: int | None = None
        self.idle_timeout: float | None = None

    def parallelism(self, replicas: int) -> Self:
        """Spread the stage over ``replicas`` consumers; keyed items are routed by key hash."""
        if not isinstance(replicas, int) or replicas < 1:
            raise ConfigurationError(f"parallelism must be a positive integer, got {replicas!r}")
        self.replicas = replicas
        return self

    def bounded(self, *, max_messages: int | None = None, idle_timeout: float | None = None) -> Self:
        """End each replica after ``max_messages`` input messages or ``idle_timeout`` seconds without one.

        A bound not passed keeps its value, as with ``Source.bounded``. Applies when the stage runs on its own
        (``run_stage``/``run_distributed``); a fused run ends with its sources (bound those with
        ``Source.bounded``).
        """
        if max_messages is not None and max_messages < 0:
            raise ConfigurationError(f"max_messages must be >= 0, got {max_messages}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ConfigurationError(f"idle_timeout must be positive, got {idle_timeout}")
        if max_messages is not None:
            self.max_messages = max_messages
        if idle_timeout is not None:
            self.idle_timeout = idle_timeout
        return self


def _broker(broker: str | Broker | None) -> tuple[Broker, bool]:
    if isinstance(broker, Broker):
        return broker, False
    url = broker or Settings().broker_url.get_secret_value()
    return broker_from_url(url), True


class Pipeline:
    """A stream pipeline: a graph of steps split into stages (see :mod:`taskstream.stream_ops.plan`).

    Args:
        name: names the pipeline's queues (``<name>-<stage>-<replica>``) and snapshots.
    """

    def __init__(self, name: str) -> None:
        self.name = check_name("pipeline", name)
        self.graph = Graph()
        self.stages: dict[str, StageSpec] = {}

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} steps={len(self.graph.nodes)}>"

    # -- building -------------------------------------------------------------------------------------

    def source(self, name: str, source: Any) -> Stream:
        """Add a source (a :class:`Source`, an iterable or an async iterable); returns its stream."""
        src = as_source(source)
        node = SourceNode(self.graph.new_id("source", name), [], source=src)
        self.graph.add(node)
        return Stream(self, node.id, keyed=False)

    def stage(self, name: str) -> StageSpec:
        """The settings of stage ``name`` (created on first use)."""
        spec = self.stages.get(name)
        if spec is None:
            spec = self.stages[name] = StageSpec(name)
        return spec

    def plan(self) -> Plan:
        """Compile into stages and queues (checks the rules; raises ConfigurationError with the reason)."""
        return compile_plan(self.name, self.graph, self.stages)

    # -- running --------------------------------------------------------------------------------------

    async def run(
        self,
        broker: str | Broker | None = None,
        *,
        now: Callable[[], float] = time.time,
        config: RunConfig | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> RunResult:
        """Run every step in this process, fused (no queues between steps), until the sources end.

        Args:
            broker: for queue sources and sinks, services and dead letters (memory by default).
            now: the time source (inject a :class:`ManualTime` in tests).
            config: batching settings.
            claim_check: where records too large for the broker go (default: from settings,
                :mod:`taskstream.payloads`).
        """
        plan = self.plan()
        b, own = _broker(broker)
        await b.connect()
        try:
            return await Runner(plan, broker=b, now=now, config=config, claim_check=claim_check).run()
        finally:
            if own:
                await b.close()

    def run_sync(self, broker: str | Broker | None = None, **kwargs: Any) -> RunResult:
        """:meth:`run` from synchronous code (not from inside a running event loop)."""
        return asyncio.run(self.run(broker, **kwargs))

    async def run_stage(
        self,
        stage: str,
        replica: int = 0,
        *,
        broker: str | Broker | None = None,
        store: StateStore | str | None = None,
        now: Callable[[], float] = time.time,
        config: RunConfig | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> RunResult:
        """Run one replica of one stage: consume its queue, publish to the next stages' queues.

        ``store`` keeps window snapshots (a URL or a store; default ``TASKSTREAM_STATE_URL`` or a SQLite file
        under ``.taskstream/``). This is what ``taskstream pipeline run module:pipeline --stage S --replica I``
        runs on each machine.
        """
        plan = self.plan()
        b, own = _broker(broker)
        st, own_store = (store, False) if isinstance(store, StateStore) else (state_store_from_url(store), True)
        await b.connect()
        try:
            runner = Runner(
                plan, broker=b, stage=stage, replica=replica, store=st, now=now, config=config, claim_check=claim_check
            )
            return await runner.run()
        finally:
            if own_store:
                await st.close()
            if own:
                await b.close()

    async def run_distributed(
        self,
        broker: str | Broker | None = None,
        *,
        store: StateStore | str | None = None,
        now: Callable[[], float] = time.time,
        config: RunConfig | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> dict[str, list[RunResult]]:
        """Run every replica of every stage as tasks of this process, talking over the broker's queues.

        The same code path as separate processes; handy on the memory broker and in tests.
        """
        plan = self.plan()
        b, own = _broker(broker)
        check = claim_check if claim_check is not None else ClaimCheck.from_settings()
        if store is None:
            st: StateStore = MemoryStateStore()
            own_store = False
        elif isinstance(store, StateStore):
            st, own_store = store, False
        else:
            st, own_store = state_store_from_url(store), True
        await b.connect()
        try:
            jobs = {
                (name, i): asyncio.create_task(
                    Runner(
                        plan, broker=b, stage=name, replica=i, store=st, now=now, config=config, claim_check=check
                    ).run(),
                    name=f"stage:{name}/{i}",
                )
                for name, sp in plan.stages.items()
                for i in range(sp.parallelism)
            }
            try:
                await asyncio.gather(*jobs.values())
            except BaseException:
                for task in jobs.values():
                    task.cancel()
                for task in jobs.values():
                    with contextlib.suppress(BaseException):
                        await task
                raise
            results: dict[str, list[RunResult]] = {}
            for (name, _), task in jobs.items():
                results.setdefault(name, []).append(task.result())
            return results
        finally:
            if own_store:
                await st.close()
            if own:
                await b.close()

    def component(
        self,
        *,
        stage: str | None = None,
        replica: int = 0,
        store: StateStore | str | None = None,
        config: RunConfig | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> PipelineComponent:
        """This pipeline as an App component: ``app.add_component(pipeline.component())``."""
        return PipelineComponent(
            self, stage=stage, replica=replica, store=store, config=config, claim_check=claim_check
        )

    def draw(self, path: str) -> None:
        """Draw stages, steps and queues to an SVG or PNG file."""
        from taskstream.stream_ops.drawing import draw_plan

        draw_plan(self.plan(), path)


class PipelineComponent:
    """Runs a pipeline (fused, or one stage replica) on an App's broker for the App's lifetime.

    ``done`` is set when the run ends by itself (finite sources, Stop, bounds); ``result`` then holds the
    :class:`RunResult`, or ``error`` the exception.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        stage: str | None,
        replica: int,
        store: StateStore | str | None,
        config: RunConfig | None,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.claim_check = claim_check
        self.stage = stage
        self.replica = replica
        self.store = store
        self.config = config
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, context: AppContext | App) -> None:
        """Start the run in the background on the broker of ``context`` (an App's context, or an App)."""
        plan = self.pipeline.plan()  # fail at start on a bad pipeline
        broker = context.broker

        async def run() -> None:
            store: StateStore | None = None
            own_store = False
            try:
                if self.stage is None:
                    self.result = await Runner(
                        plan, broker=broker, config=self.config, claim_check=self.claim_check
                    ).run()
                else:
                    if isinstance(self.store, StateStore):
                        store = self.store
                    else:
                        store, own_store = state_store_from_url(self.store), True
                    runner = Runner(
                        plan,
                        broker=broker,
                        stage=self.stage,
                        replica=self.replica,
                        store=store,
                        config=self.config,
                        claim_check=self.claim_check,
                    )
                    self.result = await runner.run()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.error = exc
                log.error("pipeline %r failed: %s: %s", self.pipeline.name, type(exc).__name__, exc)
            finally:
                if own_store and store is not None:
                    await store.close()
                self.done.set()

        self._task = asyncio.create_task(run(), name=f"pipeline:{self.pipeline.name}")

    async def wait(self) -> RunResult:
        """Wait until the run ends by itself; raise its error if it failed."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
