"""From a pipeline's graph to stages and queues.

Stage rules (what runs together as one consumer):

* a source starts a stage named after it;
* a stateful step (window, join, batch) starts a stage, named after the step or its ``stage=`` argument
  (steps given the same stage name share it);
* ``stream.stage(name)`` starts a stage explicitly;
* a merge of streams from different stages starts a stage;
* every other step (map, filter, key_by, inspect, branch, rate_limit, sink, ...) runs in the stage of its
  input: adjacent stateless steps are fused into one consumer.

Each replica ``i`` of a stage consumes one queue, ``<pipeline>-<stage>-<i>``. An edge between stages is a
publish to the downstream stage's queues: keyed items go to the replica owning their key group
(:mod:`~taskstream.stream_ops.keygroups`: ``crc32(key) % 128``, groups owned in ranges), unkeyed items take the
groups in turn. A stateful step in a stage with more than one replica must be fed from other stages (so its keys
arrive partitioned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.core import (
    Graph,
    MergeNode,
    Node,
    SourceNode,
    StageNode,
    StatefulNode,
)

if TYPE_CHECKING:
    from taskstream.stream_ops.pipeline import StageSpec

__all__ = ["Plan", "StagePlan", "compile_plan", "queue_name"]


def queue_name(pipeline: str, stage: str, replica: int) -> str:
    """A queue name every broker accepts (lower case, digits and ``-``)."""
    raw = f"{pipeline}-{stage}-{replica}".lower()
    return re.sub(r"[^a-z0-9-]", "-", raw)


@dataclass
class StagePlan:
    """One stage: its steps (in topological order), where its input comes from and where it goes."""

    name: str
    pipeline: str
    parallelism: int
    nodes: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    stateful: list[str] = field(default_factory=list)
    max_messages: int | None = None
    idle_timeout: float | None = None

    def queue(self, replica: int) -> str:
        return queue_name(self.pipeline, self.name, replica)

    @property
    def queues(self) -> list[str]:
        return [self.queue(i) for i in range(self.parallelism)]

    @property
    def consumes_queue(self) -> bool:
        return bool(self.entries)


@dataclass
class Plan:
    """Stages of a pipeline and the stage of every step."""

    pipeline: str
    graph: Graph
    stages: dict[str, StagePlan]
    stage_of: dict[str, str]
    dead_letter_queue: str

    def stage(self, name: str) -> StagePlan:
        try:
            return self.stages[name]
        except KeyError:
            raise ConfigurationError(
                f"pipeline {self.pipeline!r} has no stage {name!r}; its stages are: {', '.join(self.stages)}"
            ) from None

    def upstream_replicas(self, stage: str) -> set[str]:
        """``"stage/replica"`` of every replica that feeds ``stage``."""
        out: set[str] = set()
        for up in self.stages[stage].upstream:
            out.update(f"{up}/{i}" for i in range(self.stages[up].parallelism))
        return out

    def describe(self) -> str:
        """A few lines naming each stage, its steps, replicas and queues."""
        lines = []
        for st in self.stages.values():
            queue = st.queue(0) if st.parallelism == 1 else f"{st.queue(0)} .. {st.queue(st.parallelism - 1)}"
            source = "source" if st.sources else f"queue {queue}"
            lines.append(f"{st.name} x{st.parallelism} ({source}): {' -> '.join(st.nodes)}")
            if st.downstream:
                lines.append(f"  publishes to: {', '.join(st.downstream)}")
        return "\n".join(lines)


def _stage_for(node: Node, stage_of: dict[str, str]) -> str:
    if isinstance(node, SourceNode | StatefulNode):
        return node.stage or node.id
    if isinstance(node, StageNode):
        assert node.stage is not None
        return node.stage
    ups = [stage_of[up] for up, _ in node.inputs]
    if isinstance(node, MergeNode):
        if node.stage:
            return node.stage
        return ups[0] if len(set(ups)) == 1 else node.id
    return node.stage or ups[0]


def compile_plan(pipeline: str, graph: Graph, specs: dict[str, StageSpec]) -> Plan:
    """Assign stages, check the rules, and name queues. Raises ConfigurationError with the reason."""
    if not any(isinstance(n, SourceNode) for n in graph.nodes.values()):
        raise ConfigurationError(f"pipeline {pipeline!r} has no source: add one with pipeline.source(...)")
    stage_of: dict[str, str] = {}
    stages: dict[str, StagePlan] = {}
    for node in graph.nodes.values():
        name = _stage_for(node, stage_of)
        stage_of[node.id] = name
        st = stages.get(name)
        if st is None:
            spec = specs.get(name)
            st = stages[name] = StagePlan(
                name=name,
                pipeline=pipeline,
                parallelism=spec.replicas if spec else 1,
                max_messages=spec.max_messages if spec else None,
                idle_timeout=spec.idle_timeout if spec else None,
            )
        st.nodes.append(node.id)
        if isinstance(node, SourceNode):
            st.sources.append(node.id)
        if isinstance(node, StatefulNode):
            st.stateful.append(node.id)
        remote = [up for up, _ in node.inputs if stage_of[up] != name]
        if remote:
            if len(remote) != len(node.inputs):
                raise ConfigurationError(
                    f"step {node.id!r} reads from its own stage {name!r} and from other stages at once; "
                    "put a stage() boundary on the local input"
                )
            st.entries.append(node.id)
            for up in remote:
                up_stage = stage_of[up]
                if up_stage not in st.upstream:
                    st.upstream.append(up_stage)
                if name not in stages[up_stage].downstream:
                    stages[up_stage].downstream.append(name)
    for spec_name in specs:
        if spec_name not in stages:
            raise ConfigurationError(
                f"stage {spec_name!r} is configured but no step runs in it; the stages are: {', '.join(stages)}"
            )
    for st in stages.values():
        if st.sources and st.parallelism > 1:
            raise ConfigurationError(f"stage {st.name!r} reads a source and cannot have {st.parallelism} replicas")
        if st.parallelism > 1:
            for node_id in st.stateful:
                if node_id not in st.entries:
                    raise ConfigurationError(
                        f"stateful step {node_id!r} runs on {st.parallelism} replicas of stage {st.name!r} but is "
                        "fed from inside the stage, so its keys are not partitioned: give it its own stage"
                    )
    dlq = re.sub(r"[^a-z0-9-]", "-", f"{pipeline}-dead-letters".lower())
    return Plan(pipeline, graph, stages, stage_of, dlq)
