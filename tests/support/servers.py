"""Private broker servers the restart tests own: they may stop them; the shared servers are never touched.

* :class:`PrivateRabbitMQ`: a second RabbitMQ node on free ports, with its own node name, data, logs, config,
  plugins file and Erlang cookie (``HOME``), so it shares nothing with the machine's node but ``epmd``.
* :class:`PrivateAzurite`: a second Azurite queue service on a free port with its own ``--location``.

Each ``start`` raises :class:`Unavailable` with the reason when the server cannot run on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.ports import free_port, port_open

ROOT = Path(__file__).resolve().parents[2]


class Unavailable(RuntimeError):
    """The private server cannot run here (missing binary, or it did not come up); tests skip with this."""


class _Process:
    """A server process in its own session, so stopping it stops its children too."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, command: list[str], env: dict[str, str]) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
            )

    def wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(port):
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
        self.kill()
        raise Unavailable(f"{self.name} did not answer on 127.0.0.1:{port} within {timeout} s; its log ends:\n{tail}")

    def signal_group(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after ``timeout``."""
        if self.process is None:
            return
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group: a crash."""
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: ``start()``, ``stop()`` (clean), ``kill()`` (crash), ``start()`` again keeps
    its durable queues and persistent messages (same data directory)."""

    START_TIMEOUT = 40.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"e2e{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._process = _Process(workdir, "rabbitmq")

    @staticmethod
    def server_binary() -> str:
        """The server script that runs as the calling user (Debian's /usr/sbin wrapper switches to ``rabbitmq``)."""
        for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        raise Unavailable("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")

    def _env(self) -> dict[str, str]:
        base = self.workdir
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(exist_ok=True)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(base / "home"),  # a private Erlang cookie
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def start(self) -> None:
        self._process.spawn([self.server_binary()], self._env())
        self._process.wait_port(self.port, self.START_TIMEOUT)

    def stop(self) -> None:
        self._process.stop()

    def kill(self) -> None:
        self._process.kill()


class PrivateAzurite:
    """An Azurite queue service of its own (the project's ``.services/azurite`` install) on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"azurequeue://devstorage:{self.port}?visibility_timeout=2"
        self._process = _Process(workdir, "azurite")

    def start(self) -> None:
        installed = ROOT / ".services" / "azurite" / "node_modules" / ".bin" / "azurite-queue"
        binary = installed if installed.exists() else Path(shutil.which("azurite-queue") or installed)
        if not binary.exists():
            raise Unavailable(
                f"Azurite is not installed at {installed} nor on PATH: run scripts/services/azurite.sh "
                "(it installs Azurite only when no Azurite answers on 127.0.0.1:10001)"
            )
        location = self.workdir / "azurite-data"
        location.mkdir(exist_ok=True)
        command = [str(binary), "--queueHost", "127.0.0.1", "--queuePort", str(self.port), "--location"]
        command += [str(location), "--skipApiVersionCheck", "--silent", "--disableTelemetry"]
        self._process.spawn(command, dict(os.environ))
        self._process.wait_port(self.port, 30)

    def stop(self) -> None:
        self._process.stop()
