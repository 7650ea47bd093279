"""The health server: liveness always, readiness only while the app's consumers run; and `run --health-port`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from taskstream import App
from taskstream.health import HealthServer, Readiness, app_readiness
from tests.support.ports import free_port
from tests.support.waiting import wait_for, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def request(port: int, path: str, method: str = "GET", raw: bytes | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def make_app(hub: str) -> App:
    app = App(f"memory://{hub}")

    @app.consumer("health.in", publish_to="health.out")
    def double(n: int) -> int:
        return 2 * n

    @app.consumer("health.other")
    async def ignore(body: object) -> None:
        return None

    return app


async def test_readiness_follows_the_app_lifecycle() -> None:
    app = make_app("health-lifecycle")
    async with HealthServer(app, port=0, host="127.0.0.1") as server:
        assert await request(server.port, "/healthz") == (200, b'{"status":"ok"}\n')
        status, body = await request(server.port, "/readyz")
        assert status == 503
        assert "no consumer is running" in orjson.loads(body)["reason"]

        async with app:
            await app.publish("health.in", 21)
            status, body = await request(server.port, "/readyz")
            doc = orjson.loads(body)
            assert status == 200, doc
            assert doc["status"] == "ready"
            assert sorted(c["queue"] for c in doc["consumers"]) == ["health.in", "health.other"]
            assert all(c["running"] for c in doc["consumers"])
            await wait_for(lambda: app.consumers[0].stats.acked >= 1, what="the message acked", timeout=10)
            doc = orjson.loads((await request(server.port, "/readyz"))[1])
            assert next(c for c in doc["consumers"] if c["queue"] == "health.in")["acked"] == 1

            # One consumer stops (as it does when its broker fails for good): not ready, and it says which.
            await app.consumers[1].stop()
            status, body = await request(server.port, "/readyz")
            assert status == 503
            assert "stopped consumer(s): health.other" in orjson.loads(body)["reason"]
            assert (await request(server.port, "/healthz"))[0] == 200

        status, _ = await request(server.port, "/readyz")
        assert status == 503  # stopped app: consumers cleared


async def test_http_edges() -> None:
    app = make_app("health-edges")
    async with HealthServer(app, port=0, host="127.0.0.1") as server:
        port = server.port
        assert (await request(port, "/nope"))[0] == 404
        assert (await request(port, "/healthz", method="POST"))[0] == 405
        status, body = await request(port, "/healthz", method="HEAD")
        assert (status, body) == (200, b"")
        assert (await request(port, "/healthz?verbose=1"))[0] == 200
        assert (await request(port, "", raw=b"garbage\r\n\r\n"))[0] == 400
        # A client that connects and sends half a request does not block the others.
        _, lingering = await asyncio.open_connection("127.0.0.1", port)
        lingering.write(b"GET /hea")
        assert (await request(port, "/healthz"))[0] == 200
        lingering.close()


async def test_custom_check_and_a_failing_check() -> None:
    answers = iter([Readiness(ready=True), RuntimeError("boom")])

    def check() -> Readiness:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with HealthServer(port=0, host="127.0.0.1", check=check) as server:
        assert (await request(server.port, "/readyz"))[0] == 200
        status, body = await request(server.port, "/readyz")
        assert status == 503
        assert "RuntimeError" in orjson.loads(body)["reason"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="app or a readiness check"):
        HealthServer(port=8080)
    with pytest.raises(ValueError, match="between 0 and 65535"):
        HealthServer(make_app("health-bad"), port=70000)
    assert not app_readiness(make_app("health-idle")).ready


def http_status(port: int, path: str) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_ready(proc: subprocess.Popen[str], port: int) -> None:
    """Poll ``/readyz`` until it answers 200; fail at once if the process exits first."""

    def ready() -> bool:
        assert proc.poll() is None, f"exited with {proc.returncode} before it was ready"
        return http_status(port, "/readyz") == 200

    wait_until(ready, what=f"/readyz on port {port} to answer 200", timeout=30, interval=0.1)


def test_cli_run_serves_health_from_the_environment() -> None:
    """`taskstream run` with TASKSTREAM_HEALTH_PORT answers ready once consuming, and still stops cleanly."""
    port = free_port()
    env = {
        **os.environ,
        "TASKSTREAM_HEALTH_PORT": str(port),
        "TASKSTREAM_HEALTH_HOST": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskstream.cli", "run", "examples.two_stage:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(proc, port)
        assert http_status(port, "/healthz") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "health server on http://127.0.0.1:" in stderr


async def test_task_worker_consumers_count_for_readiness() -> None:
    app = App("memory://health-tasks")

    @app.task(queue="health.tasks")
    def add(a: int, b: int) -> int:
        return a + b

    assert not app_readiness(app).ready
    async with app:
        readiness = app_readiness(app)
        assert readiness.ready, readiness
        assert [c["queue"] for c in readiness.consumers] == ["health.tasks"]
        assert await add.submit(1, 2) == 3
    assert not app_readiness(app).ready


TASK_MODULE = """
from taskstream import App
app = App()

@app.task(queue="probe.tasks")
def ping() -> str:
    return "pong"
"""


def test_cli_worker_serves_health(tmp_path: Path) -> None:
    """`taskstream worker --health-port`: ready once the task queues are consumed; SIGTERM exits 0."""
    (tmp_path / "probe_tasks.py").write_text(TASK_MODULE)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TASKSTREAM_BROKER_URL": "memory://"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskstream.cli", "worker", "probe_tasks:app", "--health-port", str(port),
         "--health-host", "127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_ready(proc, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
