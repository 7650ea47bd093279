"""Configuration errors stop ``taskstream worker|run|pipeline run`` at start, naming the setting; secrets stay hidden.

Each test runs the real command in a subprocess. A process that wrongly starts would serve until the
deadline, so every run is bounded and killed if it outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from taskstream import App
from taskstream.errors import ConfigurationError
from taskstream.settings import Settings
from tests.support.names import unique
from tests.support.queues import delete_queues_sync
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TASKSTREAM = str(Path(sys.executable).parent / "taskstream")
SECRET = "Zm9vYmFyS2V5MTIzNDU2Nzg5MA"
RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
DEADLINE = 60.0


def clean_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSTREAM_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        TASKSTREAM_BROKER_URL="memory://",
        TASKSTREAM_PAYLOAD_STORE_URL=f"file://{tmp_path / 'payloads'}",
        TASKSTREAM_STATE_URL=f"sqlite:///{tmp_path / 'state.db'}",
        TASKSTREAM_SHUTDOWN_GRACE="1",
    )
    env.update(overrides)
    return env


def run(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``taskstream ARGS``; a process still running at the deadline is killed (it failed to stop)."""
    process = subprocess.Popen(
        [TASKSTREAM, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"taskstream {' '.join(args)} started instead of failing:\n{err[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("taskstream: error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr


WORKER = ("worker", "tests.tasks.cli_app:app", "--processes", "0")


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        ("TASKSTREAM_RESULT_STORE_URL", "foo://x", ["TASKSTREAM_RESULT_STORE_URL: ", "scheme 'foo'"]),
        (
            "TASKSTREAM_RESULT_STORE_URL",
            f"mysql://app:{SECRET}@db/results",
            ["TASKSTREAM_RESULT_STORE_URL: ", "mysql://app:***@db/results"],
        ),
        ("TASKSTREAM_RESULT_STORE_URL", "sqlite:///{tmp}/a-file/results.db", ["TASKSTREAM_RESULT_STORE_URL: ", "open"]),
        (
            "TASKSTREAM_PAYLOAD_STORE_URL",
            f"blob://c?credential={SECRET}",
            ["TASKSTREAM_PAYLOAD_STORE_URL: ", "scheme 'blob'"],
        ),
        ("TASKSTREAM_PAYLOAD_STORE_URL", "file://elsewhere/dir", ["TASKSTREAM_PAYLOAD_STORE_URL: ", "host"]),
        ("TASKSTREAM_STATE_URL", f"postgres://u:{SECRET}@db/state", ["TASKSTREAM_STATE_URL: ", "postgres://u:***@"]),
        (
            "TASKSTREAM_BROKER_URL",
            f"amqq://guest:{SECRET}@127.0.0.1/",
            ["TASKSTREAM_BROKER_URL: ", "did you mean amqp://"],
        ),
        ("TASKSTREAM_BROKER_URL", "sqs://us-east-1/?wiat_time=5", ["TASKSTREAM_BROKER_URL: ", "'wiat_time'"]),
        ("TASKSTREAM_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/?publish_timeout=-1", ["TASKSTREAM_BROKER_URL: "]),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("TASKSTREAM_") else "",
)
@pytest.mark.parametrize("command", ["worker", "run"])
def test_a_bad_url_stops_the_process_at_start_naming_its_setting(
    tmp_path: Path, command: str, variable: str, value: str, fragments: list[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    env = clean_env(tmp_path, **{variable: value.replace("{tmp}", str(tmp_path))})
    args = WORKER if command == "worker" else ("run", "tests.tasks.cli_app:app")
    assert_refused(run(*args, env=env), *fragments)


@pytest.mark.parametrize(
    ("extra_env", "args", "fragments"),
    [
        ({"TASKSTREAM_STATE_URL": "foo://x"}, [], ["TASKSTREAM_STATE_URL: ", "foo://x"]),
        ({}, ["--state", f"etcd://u:{SECRET}@h/"], ["--state: ", "etcd://u:***@h/"]),
        ({"TASKSTREAM_PAYLOAD_STORE_URL": "bogus://x"}, [], ["TASKSTREAM_PAYLOAD_STORE_URL: "]),
        ({}, ["--broker", f"rabbit://u:{SECRET}@h/"], ["--broker: ", "rabbit://u:***@h/"]),
        ({"TASKSTREAM_BROKER_URL": "zmq://127.0.0.1:5555?hearbeat=1"}, [], ["TASKSTREAM_BROKER_URL: ", "hearbeat"]),
    ],
)
def test_pipeline_run_checks_its_urls_before_running(
    tmp_path: Path, extra_env: dict[str, str], args: list[str], fragments: list[str]
) -> None:
    env = clean_env(tmp_path, SENSOR_WINDOWS_DB=str(tmp_path / "s8.db"), **extra_env)
    result = run("pipeline", "run", "examples.sensor_windows:pipeline", "--stage", "windows", *args, env=env)
    assert_refused(result, *fragments)


def test_app_start_names_the_result_store_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSTREAM_RESULT_STORE_URL", "foo://x")
    app = App()
    with pytest.raises(ConfigurationError, match=r"^TASKSTREAM_RESULT_STORE_URL: .*'foo'"):
        asyncio.run(app.start())


def test_app_names_the_argument_it_was_given() -> None:
    with pytest.raises(ConfigurationError, match=r"^App\(broker=\.\.\.\): unknown broker URL scheme 'amqq'"):
        App("amqq://h/")
    app = App(result_store="foo://x")
    with pytest.raises(ConfigurationError, match=r"^App\(result_store=\.\.\.\): "):
        asyncio.run(app.start())


def start_worker(env: dict[str, str], tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([TASKSTREAM, *WORKER, *extra], env=env, cwd=ROOT, stdout=sink, stderr=sink)
    return process, log


def wait_for_output(log: Path, process: subprocess.Popen[bytes], text: str) -> str:
    """The worker's output once it contains ``text``; fails at once if the worker exits first."""

    def written() -> str | None:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if process.poll() is not None:
            pytest.fail(f"the worker exited ({process.returncode}) before {text!r}:\n{content[-3000:]}")
        return None

    output: str = wait_until(written, what=f"{text!r} in the worker's output ({log})", timeout=DEADLINE, interval=0.1)
    return output


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.mark.memory
def test_the_worker_prints_and_logs_its_broker_url_without_secrets(tmp_path: Path) -> None:
    # the memory broker refuses unknown options, so the secret rides in the user info (its hub name)
    env = clean_env(tmp_path, TASKSTREAM_BROKER_URL=f"memory://u:{SECRET}@hub?visibility_timeout=30")
    process, log = start_worker(env, tmp_path, "--verbose")
    try:
        output = wait_for_output(log, process, "app started on")
    finally:
        assert stop(process) == 0
    output = log.read_text(errors="replace")
    assert "memory://u:***@hub?visibility_timeout=30" in output
    assert SECRET not in output


@pytest.mark.azure
def test_an_azure_worker_never_shows_its_credential(tmp_path: Path) -> None:
    url = f"azurequeue://devstorage?credential={SECRET}&poll_interval=0.5"
    queue = unique("cfg")
    env = clean_env(tmp_path, TASKSTREAM_BROKER_URL=url)
    process, log = start_worker(env, tmp_path, "--verbose", "--queues", queue)
    try:
        wait_for_output(log, process, "app started on")
    finally:
        code = stop(process)
        delete_queues_sync(url, queue)
    assert code == 0
    output = log.read_text(errors="replace")
    assert "azurequeue://devstorage?credential=***&poll_interval=0.5" in output
    assert SECRET not in output


@pytest.mark.rabbitmq
def test_empty_variables_mean_unset_so_tasks_run(tmp_path: Path) -> None:
    """``TASKSTREAM_RESULT_STORE_URL=`` (as compose files leave it) used to fail every task; now it is the default."""
    queue = unique("cfg")
    env = clean_env(
        tmp_path,
        TASKSTREAM_BROKER_URL=RABBIT,
        TASKSTREAM_RESULT_STORE_URL="",
        TASKSTREAM_PAYLOAD_STORE_URL="",
        TASKSTREAM_STATE_URL="",
        TASKSTREAM_MAX_MESSAGE_BYTES="",
        TS_TEST_QUEUE=queue,
    )
    assert Settings.model_validate({}).result_store_url is None
    process, log = start_worker(env, tmp_path, "--queues", queue)
    try:
        wait_for_output(log, process, "app started on")
        submitted = subprocess.run(
            [TASKSTREAM, "submit", "add", "2", "3", "--queue", queue, "--wait", "--timeout", "60"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        code = stop(process)
        delete_queues_sync(RABBIT, queue)
    assert code == 0
    assert submitted.returncode == 0, submitted.stderr + log.read_text(errors="replace")[-3000:]
    assert submitted.stdout.splitlines()[-1] == "5"


def test_payload_store_url_errors_never_show_its_query() -> None:
    from taskstream.payloads import blob_store_from_url

    for url in (f"s3:///prefix?aws_secret_access_key={SECRET}", f"azureblob:///p?connection_string={SECRET}"):
        with pytest.raises(ConfigurationError) as info:
            blob_store_from_url(url)
        assert SECRET not in str(info.value)


@pytest.mark.parametrize("command", ["worker", "run"])
def test_a_broker_nobody_answers_on_stops_the_process_naming_the_setting(tmp_path: Path, command: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(tmp_path, TASKSTREAM_BROKER_URL=f"amqp://guest:{SECRET}@127.0.0.1:{port}/")
    args = WORKER if command == "worker" else ("run", "tests.tasks.cli_app:app")
    assert_refused(run(*args, env=env), "TASKSTREAM_BROKER_URL: cannot connect to RabbitMQ at amqp://guest:***@")
