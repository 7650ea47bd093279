"""Scenario S8: the sensor pipeline fused on memory, then stage by stage over RabbitMQ with the window stage on
3 replicas (each its own process), and a window replica or the source stage killed mid-stream and restarted: same
results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from examples import sensor_windows
from taskstream.brokers.base import broker_from_url
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("TASKSTREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def test_fused_on_memory_windows_every_valid_reading_and_keeps_late_ones(tmp_path: Path) -> None:
    db = tmp_path / "s8.db"
    p = sensor_windows.build_pipeline(db=db, count=3000)
    result = await p.run()
    windows, late = sensor_windows.read_results(db)
    readings = sensor_windows.SimulatedSensor(4, rate=400, count=3000, start=sensor_windows.START, seed=8).readings(
        sensor_windows.START
    )
    valid = [r for r in readings if sensor_windows.valid(sensor_windows.calibrate(r))]
    late_tumbling = [row for row in late if row[0] == "tumbling"]
    counted = sum(row[4] for row in windows if row[0] == "tumbling")
    assert counted + len(late_tumbling) == len(valid)  # every valid reading is in a window or in 'late'
    assert late_tumbling, "the simulated sensor sends late readings; they must show up"
    assert result.late == len(late)
    assert {row[1] for row in windows} == {"s0", "s1", "s2", "s3"}
    for kind, _key, start, end, n, mean, lo, hi in windows:
        assert end - start == (1.0 if kind == "tumbling" else 2.0)
        assert n > 0 and lo <= mean <= hi


def _stage_command(stage: str, replica: int = 0) -> list[str]:
    code = "from taskstream.cli import main; main()"
    cmd = [sys.executable, "-c", code, "pipeline", "run", "examples.sensor_windows:pipeline", "--stage", stage]
    return [*cmd, "--replica", str(replica), "--batch-size", "64"]


class Distributed:
    """Every stage replica of the S8 pipeline as its own process on RabbitMQ."""

    def __init__(self, tmp: Path, name: str, *, count: int, realtime: bool) -> None:
        self.name = name
        self.db = tmp / f"{name}.db"
        self.state = tmp / f"{name}-state.db"
        self.logs = tmp
        self.env = {
            **os.environ,
            "TASKSTREAM_BROKER_URL": AMQP_URL,
            "TASKSTREAM_STATE_URL": f"sqlite:///{self.state}",
            "SENSOR_WINDOWS_DB": str(self.db),
            "SENSOR_WINDOWS_NAME": name,
            "SENSOR_WINDOWS_COUNT": str(count),
            "SENSOR_WINDOWS_RATE": "1000" if realtime else "400",
            "SENSOR_WINDOWS_REALTIME": "1" if realtime else "",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}

    def start(self, stage: str, replica: int = 0) -> None:
        path = self.logs / f"{self.name}-{stage}-{replica}-{len(self.procs)}-{time.monotonic_ns()}.log"
        with open(path, "ab") as log:  # the child keeps its own descriptor
            self.procs[(stage, replica)] = subprocess.Popen(
                _stage_command(stage, replica), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self, stage: str, replica: int = 0) -> str:
        return "\n".join(p.read_text() for p in sorted(self.logs.glob(f"{self.name}-{stage}-{replica}-*.log")))

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for (stage, replica), proc in self.procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"{stage}[{replica}] did not finish in {timeout} s; log:\n{self.log(stage, replica)}")
            assert code == 0, f"{stage}[{replica}] exited {code}; log:\n{self.log(stage, replica)}"

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def replica_state_rows(self, stage: str, replica: int) -> int:
        if not self.state.exists():
            return 0
        try:
            with contextlib.closing(sqlite3.connect(self.state, timeout=5)) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM taskstream_state WHERE ns = ?", (f"{self.name}/{stage}/{replica}",)
                ).fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0])

    async def cleanup(self) -> None:
        p = sensor_windows.build_pipeline(name=self.name)
        plan = p.plan()
        async with broker_from_url(AMQP_URL) as broker:
            for queue in [q for st in plan.stages.values() for q in st.queues] + [plan.dead_letter_queue]:
                try:
                    await broker.delete_queue(queue)
                except Exception:  # best effort: a queue that was never made
                    pass


async def reference(tmp: Path, count: int) -> tuple[list[Any], list[Any]]:
    db = tmp / "reference.db"
    await sensor_windows.build_pipeline(db=db, count=count, rate=1000).run()
    return sensor_windows.read_results(db)


async def _check_rabbitmq() -> None:
    try:
        async with asyncio.timeout(5), broker_from_url(AMQP_URL):
            pass
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc}); start it: bash scripts/services/rabbitmq.sh")


@pytest.mark.rabbitmq
@pytest.mark.slow
async def test_distributed_over_rabbitmq_with_three_window_replica_processes(tmp_path: Path) -> None:
    await _check_rabbitmq()
    count = 3000
    expected_windows, expected_late = await reference(tmp_path, count)
    run = Distributed(tmp_path, f"s8-{uuid.uuid4().hex[:8]}", count=count, realtime=False)
    run.env["SENSOR_WINDOWS_RATE"] = "1000"  # the reference's rate: the same event times
    try:
        for replica in range(3):
            run.start("windows", replica)
        run.start("store")
        run.start("sensor")
        await asyncio.to_thread(run.wait_all, 120)
    finally:
        run.kill_all()
        await run.cleanup()
    windows, late = sensor_windows.read_results(run.db)
    assert windows == expected_windows
    assert late == expected_late
    for replica in range(3):
        assert "ended by end-of-stream" in run.log("windows", replica)


@pytest.mark.rabbitmq
@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "replica"),
    [("sensor", 0), ("windows", 1), ("store", 0)],
    ids=["source-stage", "window-replica", "store-stage"],
)
async def test_a_stage_replica_killed_mid_stream_and_restarted_gives_the_fused_results(
    tmp_path: Path, stage: str, replica: int
) -> None:
    """SIGKILL one process of S8 run stage by stage, once it has committed a snapshot, and start it again with the
    same command: the source resumes at its committed position (no replayed readings), a window replica restores
    its windows, the store stage's unacked results come back and are upserted; the results equal the fused run."""
    await _check_rabbitmq()
    count = 4000
    expected_windows, expected_late = await reference(tmp_path, count)
    run = Distributed(tmp_path, f"s8kill-{stage}-{uuid.uuid4().hex[:8]}", count=count, realtime=True)  # ~4 s
    try:
        for window in range(3):
            run.start("windows", window)
        run.start("store")
        run.start("sensor")

        def committed() -> int:  # it has taken input and committed a snapshot
            proc = run.procs[(stage, replica)]
            assert proc.poll() is None, f"{stage}/{replica} exited with {proc.returncode}:\n{run.log(stage, replica)}"
            return run.replica_state_rows(stage, replica)

        await wait_for(committed, what=f"a snapshot of {stage}/{replica}", timeout=30)
        await asyncio.sleep(0.3)  # not synchronisation: lets it take input past that snapshot, lost by the kill
        proc = run.procs[(stage, replica)]
        assert proc.poll() is None, f"{stage}/{replica} finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(0.5)  # not synchronisation: the others run on while it is down
        run.start(stage, replica)  # same command: it restores its snapshot and goes on
        await asyncio.to_thread(run.wait_all, 120)
    finally:
        run.kill_all()
        await run.cleanup()
    assert "restored snapshot" in run.log(stage, replica)
    windows, late = sensor_windows.read_results(run.db)
    assert windows == expected_windows  # a replayed reading would be counted twice or reported late
    assert late == expected_late
