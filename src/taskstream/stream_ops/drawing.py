"""Draw a pipeline's stages, steps and queues (SVG or PNG, with matplotlib).

Stages are boxes laid out left to right by depth, listing their steps; the title line says how many replicas
run the stage. Arrows between stages are queues, labelled with the queue name(s) just above the arrow (level
where the two boxes face each other, else slanted, with the label along it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.core import OpNode, SinkNode, SourceNode, StatefulNode
from taskstream.stream_ops.plan import Plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["draw_plan", "plan_figure", "to_dot"]


def _depths(plan: Plan) -> dict[str, int]:
    depth: dict[str, int] = {}
    for name, st in plan.stages.items():  # stages are created in topological order
        depth[name] = 1 + max((depth[u] for u in st.upstream), default=-1)
    return depth


def _step_label(plan: Plan, node_id: str) -> str:
    node = plan.graph.nodes[node_id]
    if isinstance(node, SourceNode) and node.source is not None:
        return f"{node_id} [{node.source.label}]"
    if isinstance(node, SinkNode) and node.sink is not None:
        return f"{node_id} -> {node.sink.label}"
    if isinstance(node, OpNode | StatefulNode):
        return node_id if node_id.startswith(node.label) else f"{node_id} ({node.label})"
    return node_id


def to_dot(plan: Plan) -> str:
    """The plan in Graphviz dot syntax."""
    lines = [f'digraph "{plan.pipeline}" {{', "  rankdir=LR; node [shape=box, fontname=Helvetica];"]
    for st in plan.stages.values():
        steps = "\\l".join(_step_label(plan, n) for n in st.nodes)
        lines.append(f'  "{st.name}" [label="{st.name} x{st.parallelism}\\n{steps}\\l"];')
    for st in plan.stages.values():
        for down in st.downstream:
            target = plan.stages[down]
            lines.append(f'  "{st.name}" -> "{down}" [label="{target.queue(0)}"];')
    lines.append("}")
    return "\n".join(lines)


def draw_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the drawing to ``path`` (``.svg`` or ``.png``)."""
    out = Path(path)
    if out.suffix.lower() not in (".svg", ".png"):
        raise ConfigurationError(f"graph output must end in .svg or .png, got {out.name!r}")
    fig = plan_figure(plan)
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format=out.suffix.lower().lstrip("."), bbox_inches="tight")
    finally:
        plt.close(fig)


def plan_figure(plan: Plan) -> Figure:
    """The drawing as a matplotlib figure (close it with ``matplotlib.pyplot.close`` when done)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError as exc:  # pragma: no cover - the plot extra is in dev
        raise ConfigurationError("drawing needs matplotlib: pip install 'taskstream[plot]'") from exc

    depth = _depths(plan)
    columns: dict[int, list[str]] = {}
    for name, d in depth.items():
        columns.setdefault(d, []).append(name)
    labels = {name: _queue_label(plan, name) for name in plan.stages}
    longest = max((len(labels[d]) for st in plan.stages.values() for d in st.downstream), default=0)
    # the gap between columns holds the longest queue label along its arrow (7 pt text: ~0.06 units a character)
    box_w, gap_x, line_h = 3.2, max(1.6, 0.06 * longest + 0.6), 0.28
    heights = {name: 0.7 + line_h * len(st.nodes) for name, st in plan.stages.items()}
    col_heights = [sum(heights[n] for n in names) + 0.6 * (len(names) - 1) for names in columns.values()]
    total_h = max(col_heights) + 1.0
    total_w = len(columns) * box_w + (len(columns) - 1) * gap_x + 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, total_w * 1.1), max(2.5, total_h * 1.1)))
    ax.set_xlim(0, total_w)
    ax.set_ylim(0, total_h)
    ax.axis("off")
    ax.set_title(f"pipeline {plan.pipeline}", fontsize=11)
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for d, names in sorted(columns.items()):
        x = 0.5 + d * (box_w + gap_x)
        y = total_h - 0.5
        for name in names:
            st = plan.stages[name]
            h = heights[name]
            y0 = y - h
            boxes[name] = (x, y0, box_w, h)
            color = "#dbeafe" if st.sources else ("#fde68a" if st.stateful else "#e5e7eb")
            ax.add_patch(FancyBboxPatch((x, y0), box_w, h, boxstyle="round,pad=0.05", fc=color, ec="#374151"))
            title = f"{name}  x{st.parallelism}" if st.parallelism > 1 else name
            ax.text(x + 0.12, y - 0.3, title, fontsize=9, fontweight="bold", va="center")
            for i, node_id in enumerate(st.nodes):
                ax.text(x + 0.2, y - 0.62 - i * line_h, _step_label(plan, node_id), fontsize=7, va="center")
            y = y0 - 0.6
    for st in plan.stages.values():
        for down in st.downstream:
            sx, sy, sw, sh = boxes[st.name]
            tx, ty, _tw, th = boxes[down]
            lo, hi = max(sy, ty) + 0.2, min(sy + sh, ty + th) - 0.2
            if hi >= lo:  # the boxes face each other: a level arrow through the middle of what they share
                start, end = (sx + sw + 0.05, (lo + hi) / 2), (tx - 0.05, (lo + hi) / 2)
            else:
                start, end = (sx + sw + 0.05, sy + sh / 2), (tx - 0.05, ty + th / 2)
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#1f2937"))
            # the label runs along the arrow, lifted off it by a few points on its upper side
            (x0, y0_), (x1, y1) = ax.transData.transform([start, end])
            angle = math.atan2(y1 - y0_, x1 - x0)
            lift = 3.0
            ax.annotate(
                labels[down],
                xy=((start[0] + end[0]) / 2, (start[1] + end[1]) / 2),
                xytext=(-math.sin(angle) * lift, math.cos(angle) * lift),
                textcoords="offset points",
                rotation=math.degrees(angle),
                rotation_mode="anchor",
                ha="center",
                va="bottom",
                fontsize=7,
                color="#374151",
            )
    return fig


def _queue_label(plan: Plan, name: str) -> str:
    """The queue(s) of stage ``name``: ``<queue-0>``, or ``<queue-0>..<last replica>``."""
    target = plan.stages[name]
    return target.queue(0) if target.parallelism == 1 else f"{target.queue(0)}..{target.parallelism - 1}"
