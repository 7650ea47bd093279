"""S8 stage by stage on hosts apart: window replicas on two hosts, RabbitMQ on a third, a link cut mid-run.

``examples/sensor_windows.py`` runs as five ``taskstream pipeline run`` processes: window replicas 0 and 1 on the
first host, replica 2, the store stage and the sensor source on the second, RabbitMQ in the broker's namespace.
The sensor emits in real time (so the run lasts long enough for the cut); the first host's link goes down for
5 s mid-run and comes back. The window and late-reading tables must equal those of the fused run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from examples.sensor_windows import build_pipeline, read_results

from tests.cluster.nodes import ScriptCluster
from tests.cluster.traffic import ROOT
from tests.netns.hosts import Network
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

COUNT = 4000
TASKSTREAM = str(Path(sys.executable).parent / "taskstream")


def spawn_stage(
    prefix: Sequence[str], env: dict[str, str], stage: str, replica: int, workdir: Path
) -> subprocess.Popen[bytes]:
    state = f"sqlite:///{workdir / f'state-{stage}-{replica}.db'}"
    command = [*prefix, TASKSTREAM, "pipeline", "run", "examples.sensor_windows:pipeline", "--stage", stage]
    command += ["--replica", str(replica), "--state", state]
    with (workdir / f"{stage}-{replica}.out").open("wb") as sink:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def consuming(node: ScriptCluster, pipeline: str) -> int:
    """How many of ``pipeline``'s queues have a consumer."""
    rows = node.ctl_json("list_queues", "name", "consumers", via=1)
    return sum(1 for row in rows if row["name"].startswith(pipeline + "-") and row["consumers"] > 0)


def tails(workdir: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace")[-1500:] for p in workdir.glob("*.out")}


async def test_s8_stage_by_stage_across_hosts_with_a_link_cut_equals_the_fused_run(
    network: Network, broker_node: ScriptCluster, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    name = f"s8-{uuid.uuid4().hex[:6]}"
    fused_db = tmp_path / "fused.db"
    await build_pipeline(db=fused_db, count=COUNT, name=name + "-fused").run("memory://")
    fused = read_results(fused_db)

    first, second = network.hosts
    port = broker_node.port(1)
    staged_db = tmp_path / "staged.db"

    def env_for(address: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKSTREAM_", "SENSOR_WINDOWS_"))}
        env.update(
            TASKSTREAM_BROKER_URL=f"amqp://guest:guest@{address}:{port}/?heartbeat=1",
            SENSOR_WINDOWS_DB=str(staged_db),
            SENSOR_WINDOWS_COUNT=str(COUNT),
            SENSOR_WINDOWS_NAME=name,
            SENSOR_WINDOWS_REALTIME="1",
        )
        return env

    on_first, on_second = env_for(first.broker_address), env_for(second.broker_address)
    started = time.monotonic()
    processes = [
        spawn_stage(first.exec_prefix(), on_first, "windows", 0, tmp_path),
        spawn_stage(first.exec_prefix(), on_first, "windows", 1, tmp_path),
        spawn_stage(second.exec_prefix(), on_second, "windows", 2, tmp_path),
        spawn_stage(second.exec_prefix(), on_second, "store", 0, tmp_path),
    ]
    try:
        # every replica and the store consume before the source publishes (and before the cut: a first
        # connect that fails stops the process, for its supervisor to start again)
        await wait_for(
            lambda: consuming(broker_node, name) >= 4, what="the four consuming stages connected", timeout=120
        )
        processes.append(spawn_stage(second.exec_prefix(), on_second, "sensor", 0, tmp_path))
        await asyncio.sleep(2)
        assert processes[-1].poll() is None, "the source ended before the cut: the cut would not be mid-run"
        first.cut()
        await asyncio.sleep(5)
        first.restore()
        await wait_for(
            lambda: all(p.poll() is not None for p in processes) or any(p.poll() for p in processes),
            what="every stage ended by end-of-stream",
            timeout=180,
            interval=0.2,
        )
        codes = [p.poll() for p in processes]
        assert codes == [0] * len(processes), await asyncio.to_thread(tails, tmp_path)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)
    staged = read_results(staged_db)
    record_property("windows", len(staged[0]))
    record_property("late", len(staged[1]))
    record_property("seconds", round(time.monotonic() - started, 1))
    print(f"\nS8 across hosts: {len(staged[0])} windows, {len(staged[1])} late, {time.monotonic() - started:.1f} s")
    assert len(fused[0]) > 10
    assert staged == fused
