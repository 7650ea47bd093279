"""``taskstream pipeline run|graph|stages|stop|rescale``."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from examples import sensor_windows
from taskstream.cli import _register_extensions, cli

_register_extensions()
runner = CliRunner()


def test_graph_writes_svg_and_png_and_dot(tmp_path: Path) -> None:
    for suffix in ("svg", "png"):
        out = tmp_path / f"s8.{suffix}"
        result = runner.invoke(cli, ["pipeline", "graph", "examples.sensor_windows:pipeline", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert out.stat().st_size > 1000
    assert (tmp_path / "s8.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "s8.png").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(cli, ["pipeline", "graph", "examples.sensor_windows:pipeline", "--dot"])
    assert '"sensor" -> "windows"' in result.output and "x3" in result.output
    result = runner.invoke(cli, ["pipeline", "graph", "examples.sensor_windows:pipeline", "-o", "x.gif"])
    assert result.exit_code != 0


def test_stages_lists_stages_replicas_and_queues() -> None:
    result = runner.invoke(cli, ["pipeline", "stages", "examples.sensor_windows:build_pipeline"])
    assert result.exit_code == 0, result.output
    assert "windows x3" in result.output and "sensor-windows-windows-2" in result.output


def test_run_fused_and_run_one_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "cli.db"
    module = tmp_path / "cli_pipeline.py"
    module.write_text(
        "from examples.sensor_windows import build_pipeline\n"
        f"pipeline = build_pipeline(db={str(db)!r}, count=800, name='cli-s8')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(cli, ["pipeline", "run", "cli_pipeline:pipeline", "--broker", "memory://"])
    assert result.exit_code == 0, result.output
    assert "ended by end-of-stream" in result.output
    windows, _late = sensor_windows.read_results(db)
    assert len(windows) > 10
    # one stage replica: the source stage publishes to its queues and ends (memory broker: in this process)
    state = f"sqlite:///{tmp_path / 'state.db'}"  # the source stage snapshots its position
    result = runner.invoke(
        cli,
        ["pipeline", "run", "cli_pipeline:pipeline", "--stage", "sensor", "--broker", "memory://", "--state", state],
    )
    assert result.exit_code == 0, result.output
    assert "stage 'sensor' replica 0" in result.output
    result = runner.invoke(cli, ["pipeline", "run", "cli_pipeline:pipeline", "--stage", "nope"])
    assert result.exit_code != 0
    assert "no stage 'nope'" in str(result.exception)


def test_stop_puts_a_stop_message(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["pipeline", "stop", "some-queue", "--broker", "memory://"])
    assert result.exit_code == 0 and "sent Stop" in result.output


def test_rescale_moves_a_stage_to_the_pipelines_parallelism_and_refuses_a_source_stage(tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    args = ["pipeline", "rescale", "examples.sensor_windows:build_pipeline", "--broker", "memory://", "--state", state]
    result = runner.invoke(cli, [*args, "--stage", "windows", "--from", "2"])
    assert result.exit_code == 0, result.output
    assert "stage 'windows': 2 -> 3 replicas" in result.output
    result = runner.invoke(cli, [*args, "--stage", "sensor", "--from", "2"])
    assert result.exit_code != 0 and "reads a source" in str(result.exception)


def test_target_that_is_not_a_pipeline_is_refused() -> None:
    result = runner.invoke(cli, ["pipeline", "stages", "examples.sensor_windows:START"])
    assert result.exit_code != 0
    assert "not a taskstream Pipeline" in str(result.exception)


def test_sqlite_state_store_default_url_is_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskstream.stream_ops import state_store_from_url

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKSTREAM_STATE_URL", raising=False)
    store = state_store_from_url()

    async def go() -> None:
        await store.commit("ns", {"k": 1})
        await store.close()

    asyncio.run(go())
    with contextlib.closing(sqlite3.connect(tmp_path / ".taskstream" / "state.db")) as conn:
        assert conn.execute("SELECT count(*) FROM taskstream_state").fetchone() == (1,)


def test_queue_labels_of_the_graph_sit_beside_their_arrows_not_on_them() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from taskstream.stream_ops.drawing import plan_figure

    plan = sensor_windows.build_pipeline().plan()
    fig = plan_figure(plan)
    try:
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        ax = fig.axes[0]
        arrows = [p.get_path().transformed(p.get_transform()) for p in ax.patches if isinstance(p, FancyArrowPatch)]
        boxes = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, FancyBboxPatch)]
        labels = [t for t in ax.texts if t.get_text().startswith(f"{plan.pipeline}-")]
        assert len(arrows) == 2 and len(boxes) == 3
        assert sorted(t.get_text() for t in labels) == ["sensor-windows-store-0", "sensor-windows-windows-0..2"]
        for label in labels:
            extent = label.get_window_extent(renderer)
            for arrow in arrows:
                assert not arrow.intersects_bbox(extent, filled=False), f"{label.get_text()!r} lies on an arrow"
            for box in boxes:
                assert not box.overlaps(extent), f"{label.get_text()!r} overlaps a stage box"
    finally:
        plt.close(fig)
