"""``taskstream worker`` / ``submit`` / ``status`` as separate processes over RabbitMQ (the funcX endpoint flow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskstream.tasks.stores.base import result_store_from_url
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.names import unique
from tests.support.queues import delete_queues_sync
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TASKSTREAM = str(Path(sys.executable).parent / "taskstream")


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TASKSTREAM, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TASKSTREAM_BROKER_URL=URL,
        TASKSTREAM_RESULT_STORE_URL=f"sqlite:///{tmp_path / 'results.sqlite3'}",
        TASKSTREAM_SHUTDOWN_GRACE="2",
        TS_TEST_QUEUE=unique("cli"),
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture
def worker(cli_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            TASKSTREAM,
            "worker",
            "tests.tasks.cli_app:app",
            "--queues",
            cli_env["TS_TEST_QUEUE"],
            "--concurrency",
            "4",
            "--autoscale",
            "1:2",
            "--idle-timeout",
            "2",
        ],
        env=cli_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(10)
    delete_queues_sync(cli_env["TASKSTREAM_BROKER_URL"], cli_env["TS_TEST_QUEUE"])


def wait_status(task_id: str, env: dict[str, str], wanted: str, timeout: float = 60) -> dict[str, object]:
    """Poll the shared result store, then check ``taskstream status --json`` (another process) agrees."""
    store = result_store_from_url(env["TASKSTREAM_RESULT_STORE_URL"])

    def reached() -> bool:
        info = store.get(task_id)
        return info is not None and info.status == wanted

    wait_until(reached, what=f"task {task_id} to reach {wanted!r} in the result store", timeout=timeout)
    out = run("status", task_id, "--json", env=env)
    assert out.returncode == 0, out.stderr
    record: dict[str, object] = json.loads(out.stdout)
    assert record["status"] == wanted
    return record


@pytest.mark.rabbitmq
def test_endpoint_flow_worker_submit_status(worker: subprocess.Popen[str], cli_env: dict[str, str]) -> None:
    queue = cli_env["TS_TEST_QUEUE"]
    waited = run("submit", "add", "2", "40", "--queue", queue, "--wait", "--timeout", "60", env=cli_env)
    assert waited.returncode == 0, waited.stderr
    task_id, value = waited.stdout.split()
    assert value == "42"
    assert wait_status(task_id, cli_env, "success")["result"] == 42

    # Fire and forget, then ask by id (another process); cpu_bound runs in a worker process with its model.
    sent = run("submit", "model_info", "--queue", queue, env=cli_env)
    assert sent.returncode == 0, sent.stderr
    record = wait_status(sent.stdout.strip(), cli_env, "success")
    assert isinstance(record["result"], dict) and record["result"]["loads"] == 1

    failed = run("submit", "fail", '"no coffee"', "--queue", queue, "--wait", env=cli_env)
    assert failed.returncode == 1 and "ValueError: no coffee" in failed.stderr
    shown = run("status", failed.stdout.split()[0], env=cli_env)
    assert "failed" in shown.stdout and "raise ValueError(message)" in shown.stdout

    missing = run("status", "no-such-task", env=cli_env)
    assert missing.returncode == 2 and "no task 'no-such-task'" in missing.stderr

    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    assert "processes 1..2" in output


def test_bad_worker_options_say_what_is_wrong(cli_env: dict[str, str]) -> None:
    out = run("worker", "tests.tasks.cli_app:app", "--autoscale", "3", env=cli_env)
    assert out.returncode == 2 and "MIN:MAX" in out.stderr
    out = run("worker", "tests.tasks.cli_app:app", "--autoscale", "1:2", "--processes", "2", env=cli_env)
    assert out.returncode == 2 and "not both" in out.stderr
    out = run("worker", "tests.tasks.no_such_module:app", env=cli_env)
    assert out.returncode == 2 and "cannot import" in out.stderr
