"""Every taskstream service of docker-compose.yml, run natively: the stack without a Docker engine.

Each service becomes a local process with the same command line (the image's entry point ``taskstream`` plus
the service's ``command``) and the same environment (the Dockerfile's ``ENV`` plus the service's
``environment``), in a fresh working directory as the image's ``/var/lib/taskstream``. Only addresses are
mapped, as Docker's network would: a compose service's ``host:container-port`` becomes the local server on the
port the compose file publishes it on, each container's health port a free local port, and the broker URL gets
a RabbitMQ virtual host of its own so the run shares nothing with other tests on the same server.

The test then does what a user of ``docker compose up`` sees: the health checks pass (run natively as well),
the worker answers a task, and the sensor pipeline's store fills with window results, which must equal those of
the same pipeline run fused in one process on the embedded broker. SIGTERM stops every service with exit 0.

Prometheus runs natively too, with the stack's scrape config (deploy/prometheus/prometheus.yml) whose targets
are mapped the same way: every target is up, every query of the Grafana dashboard answers (only the dead-letter
and publish-error series may be absent while nothing failed), and the tasks it counts are the ones submitted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit
from urllib.request import urlopen

import pytest
import yaml

from examples import sensor_windows, stack
from tests.support.ports import free_port
from tests.support.waiting import wait_until

from .conftest import ROOT, VENV_BIN, require_tool
from .test_compose import PROMETHEUS_CONFIG, dashboard_queries, load_compose, load_dashboard, taskstream_services
from .test_image import instructions, stages

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

IMAGE_PATHS = {"/opt/taskstream/venv": str(VENV_BIN.parent), "/app": str(ROOT)}
MIN_WINDOW_ROWS = 16
SAMPLES, SEED = 20_000, 7
#: series that exist only after a failure: their dashboard queries may answer nothing in a healthy run
ONLY_AFTER_FAILURES = ("taskstream_messages_dead_lettered_total", "taskstream_publish_errors_total")


INHERITED = ("HOME", "XDG_CACHE_HOME", "LANG", "TMPDIR", "OPENBLAS_CORETYPE")  # XDG_CACHE_HOME: the run's, not ~/.cache


def image_env() -> dict[str, str]:
    """The final stage's ENV of the Dockerfile, with image paths mapped onto this checkout and venv."""
    env: dict[str, str] = {}
    final = stages(instructions(ROOT / "Dockerfile"))[-1]
    for keyword, rest in final:
        if keyword != "ENV":
            continue
        for pair in rest.split():
            name, _, value = pair.partition("=")
            for image_path, local in IMAGE_PATHS.items():
                value = value.replace(image_path, local)
            env[name] = value.replace("$PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    return env


def published_ports(compose: dict[str, Any]) -> dict[tuple[str, int], int]:
    """(service, container port) -> the host port the compose file publishes it on."""
    mapping = {}
    for name, svc in compose["services"].items():
        for entry in svc.get("ports", []):
            host, _, container = str(entry).rpartition(":")
            mapping[(name, int(container))] = int(host)
    return mapping


def rabbitmqctl(*args: str) -> None:
    tool = require_tool("rabbitmqctl")
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stdout}{result.stderr}"


@pytest.fixture
def vhost() -> Iterator[str]:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=3):
            pass
    except OSError:
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672: bash scripts/services/rabbitmq.sh")
    name = f"compose-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


class NativeStack:
    """The compose file's taskstream services as local processes."""

    def __init__(self, compose: dict[str, Any], workdir: Path, vhost: str) -> None:
        self.compose = compose
        self.services = taskstream_services(compose)
        self.workdir = workdir
        self.vhost = vhost
        self.ports = published_ports(compose)
        self.health_ports: dict[str, dict[int, int]] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []
        self.base_env = {
            **{k: os.environ[k] for k in INHERITED if k in os.environ},
            **image_env(),
        }

    # -- mapping ------------------------------------------------------------------------------------

    def map_value(self, value: str) -> str:
        for (service, container), host in self.ports.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(service)}:{container}(?!\d)", f"127.0.0.1:{host}", value)
        if value.startswith(("amqp://", "amqps://")):
            value = urlunsplit(urlsplit(value)._replace(path="/" + self.vhost))
        return value

    def env(self, name: str) -> dict[str, str]:
        env = dict(self.base_env)
        ports = self.health_ports.setdefault(name, {})
        for key, value in self.services[name].get("environment", {}).items():
            value = str(value)
            if key == "TASKSTREAM_HEALTH_PORT":
                ports[int(value)] = ports.get(int(value)) or free_port()
                value = str(ports[int(value)])
            env[key] = self.map_value(value)
        return env

    def argv(self, name: str) -> list[str]:
        entrypoint = ["taskstream"]  # the Dockerfile's ENTRYPOINT, checked in test_image.py
        program = shutil.which(entrypoint[0], path=self.base_env["PATH"])
        assert program == str(VENV_BIN / "taskstream"), program
        return [program, *entrypoint[1:], *self.services[name]["command"]]

    # -- processes ----------------------------------------------------------------------------------

    def start_order(self) -> list[str]:
        """Services after the taskstream services they depend on (servers are already up)."""
        order: list[str] = []
        pending = dict.fromkeys(self.services)
        while pending:
            ready = [n for n in pending if all(d not in pending for d in self.services[n].get("depends_on", {}))]
            assert ready, f"depends_on cycle among {list(pending)}"
            for name in ready:
                order.append(name)
                del pending[name]
        return order

    def start(self, name: str) -> None:
        cwd = self.workdir / name  # the image's working directory, fresh per container
        cwd.mkdir(parents=True)
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            self.argv(name), cwd=cwd, env=self.env(name), stdout=log, stderr=subprocess.STDOUT
        )

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)[-3000:]}"

    def healthcheck(self, name: str) -> bool:
        """Run the service's health check command natively (its port mapped); True when it passes."""
        check = self.services[name].get("healthcheck")
        assert check is not None
        kind, *argv = check["test"]
        assert kind == "CMD", "health checks are exec form"
        original = list(argv)
        for container, local in self.health_ports[name].items():
            argv = [a.replace(f"127.0.0.1:{container}", f"127.0.0.1:{local}") for a in argv]
        assert argv != original, f"{name}: the health check probes no port the service configures"
        if argv[0] == "python":
            argv[0] = sys.executable
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        for log in self.logs:
            log.close()
        return codes


class NativePrometheus:
    """The stack's Prometheus as a local process: its scrape config with every target mapped onto the native stack."""

    def __init__(self, native: NativeStack, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")  # quick to see, same targets
        self.targets = 0
        for job in config["scrape_configs"]:
            for group in job.get("static_configs", []):
                group["targets"] = [self.map_target(native, target) for target in group["targets"]]
                self.targets += len(group["targets"])
        workdir.mkdir(parents=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                require_tool("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def map_target(self, native: NativeStack, target: str) -> str:
        host, _, port = target.rpartition(":")
        if host in native.services:
            return f"127.0.0.1:{native.health_ports[host][int(port)]}"
        if host == "prometheus":
            return f"127.0.0.1:{self.port}"
        pytest.fail(f"scrape target {target} is no service the native stack runs")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (empty while Prometheus is not up yet)."""
        assert self.proc.poll() is None, (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]
        try:
            with urlopen(f"http://127.0.0.1:{self.port}/api/v1/query?{urlencode({'query': expr})}", timeout=10) as r:
                answer = json.load(r)
        except OSError:
            return []
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def unanswered(self) -> list[str]:
        """The dashboard queries that answer nothing yet."""
        return [
            f"{title} {ref}: {expr}"
            for title, ref, expr in dashboard_queries(load_dashboard())
            if not any(name in expr for name in ONLY_AFTER_FAILURES) and not self.query(expr)
        ]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def window_rows(db: Path) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    try:
        return sensor_windows.read_results(db)[0]
    except sqlite3.OperationalError:  # tables not created yet, or busy
        return []


def wait_stack(condition: Any, stack_: NativeStack, timeout: float, what: str) -> None:
    """Poll ``condition`` while every service keeps running; on a timeout, fail with the services' logs."""

    def holds() -> Any:
        stack_.assert_running()
        return condition()

    try:
        wait_until(holds, what=what, timeout=timeout, interval=0.2)
    except pytest.fail.Exception as timed_out:
        logs = "\n".join(f"--- {n}\n{stack_.log(n)[-1500:]}" for n in stack_.procs)
        pytest.fail(f"{timed_out.msg}\n{logs}")


def submit_task(env: dict[str, str], cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`taskstream submit NAME ARGS --wait` from a client with the worker's environment."""
    program = shutil.which("taskstream", path=env["PATH"])
    assert program is not None
    return subprocess.run(
        [program, "submit", *argv, "--wait", "--timeout", "60"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_prometheus(prometheus: NativePrometheus, native: NativeStack) -> None:
    """Every target up, every dashboard query answered, and the two submitted tasks counted as successes."""
    wait_stack(lambda: len(prometheus.query("up == 1")) == prometheus.targets, native, 60, "every scrape target up")
    finished = 'sum by (task, status) (taskstream_tasks_finished_total{job="taskstream-worker"})'

    def counted() -> dict[tuple[str, str], float]:
        return {(r["metric"]["task"], r["metric"]["status"]): float(r["value"][1]) for r in prometheus.query(finished)}

    wait_stack(lambda: len(counted()) == 2, native, 60, "the finished tasks in Prometheus")
    assert counted() == {("estimate_pi", "success"): 1.0, ("window_stats", "success"): 1.0}
    wait_stack(lambda: not prometheus.unanswered(), native, 60, "answers to the dashboard's queries")
    stages = prometheus.query('sum by (stage) (taskstream_stream_records_out_total{job="taskstream-pipeline"})')
    assert {r["metric"]["stage"] for r in stages} == {"sensor", "windows", "store"}
    assert all(float(r["value"][1]) > 0 for r in stages), stages


def test_every_taskstream_service_runs_natively(tmp_path: Path, vhost: str) -> None:
    compose = load_compose()
    native = NativeStack(compose, tmp_path / "containers", vhost)
    assert set(native.services) >= {"worker", "sensor-source", "sensor-store"}
    order = native.start_order()
    assert order[-1] == "sensor-source", order

    prometheus: NativePrometheus | None = None
    try:
        for name in order:
            native.start(name)
        prometheus = NativePrometheus(native, tmp_path / "prometheus")

        # Health checks, as compose runs them, pass once each service is consuming.
        for name in [n for n in native.services if "healthcheck" in native.services[n]]:
            wait_stack(lambda n=name: native.healthcheck(n), native, 60, f"{name}'s health check")

        # The worker serves the example tasks: a CPU-bound one (worker processes) and a plain one.
        client = native.env("worker")
        result = submit_task(client, tmp_path, "estimate_pi", str(SAMPLES), str(SEED), "--queue", stack.TASK_QUEUE)
        assert result.returncode == 0, result.stderr
        assert float(result.stdout.split()[-1]) == stack.estimate_pi.func(SAMPLES, SEED)
        result = submit_task(client, tmp_path, "window_stats", "[1.0, 2.0, 4.5]", "--queue", stack.TASK_QUEUE)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == {"count": 3, "mean": 2.5, "min": 1.0, "max": 4.5}

        # The pipeline produces window results.
        db = native.workdir / "sensor-store" / stack.RESULTS_DB
        wait_stack(lambda: len(window_rows(db)) >= MIN_WINDOW_ROWS, native, 90, f"{MIN_WINDOW_ROWS} window results")

        check_prometheus(prometheus, native)
        native.assert_running()
    finally:
        codes = native.stop()
        if prometheus is not None:
            prometheus.stop()

    assert codes == dict.fromkeys(native.procs, 0), {n: native.log(n)[-2000:] for n, c in codes.items() if c}
    for name in native.procs:
        assert "Traceback" not in native.log(name), native.log(name)

    # Every window the stack closed equals the same window of the pipeline fused on the embedded broker.
    rows = window_rows(db)
    assert len(rows) >= MIN_WINDOW_ROWS
    last_end = max(row[3] for row in rows)
    count = int((last_end - sensor_windows.START + 5) * stack.RATE)
    reference_db = tmp_path / "reference.db"
    reference = sensor_windows.build_pipeline(db=reference_db, count=count, rate=stack.RATE, name="reference")
    asyncio.run(reference.run())
    expected = {row[:3]: row for row in sensor_windows.read_results(reference_db)[0]}
    for row in rows:
        assert expected.get(row[:3]) == row, f"stack row {row} differs from the fused run's {expected.get(row[:3])}"
    assert {row[1] for row in rows} == {"s0", "s1", "s2", "s3"}
    assert {row[0] for row in rows} == {"tumbling", "sliding"}
    assert (native.workdir / "sensor-store" / stack.RESULTS_JSONL).stat().st_size > 0
