"""A private RabbitMQ cluster driven through ``scripts/services/rabbitmq-cluster.sh``, for the tests that lose nodes.

:class:`ScriptCluster` starts the nodes on free ports with a node-name prefix and data directory of its own, so it
shares nothing with the machine's RabbitMQ (nor with a cluster someone started by hand), and stops them at the end.
``prefix`` runs every script call under another command (``ip netns exec NS``) for the network-namespace tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services" / "rabbitmq-cluster.sh"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here (no RabbitMQ installed, or it did not start): tests skip with the reason."""


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base(count: int) -> int:
    """A port ``p`` with ``p .. p+count-1`` and ``p+20000 ..`` (distribution ports) all free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + 20000 + count >= 65535:
            continue
        if all(_free(base + i) and _free(base + 20000 + i) for i in range(count)):
            return base
    raise ClusterUnavailable("no free ports for the private cluster")


class ScriptCluster:
    """``nodes`` private RabbitMQ nodes joined in one cluster (node ``n`` counts from 1).

    Args:
        workdir: data, logs and cookie of the nodes.
        nodes: how many nodes.
        listen: the address their AMQP listeners bind (``0.0.0.0`` also lets ``guest`` in from other hosts).
        host: the address clients use in the URL.
        prefix: a command every script call runs under (``["ip", "netns", "exec", "ns"]``).
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        *,
        listen: str = "127.0.0.1",
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        self.nodes = nodes
        self.host = host
        self.prefix = list(prefix)
        self.base_port = free_port_base(nodes)
        self.name = f"ts{uuid.uuid4().hex[:6]}n"
        self.env = dict(
            os.environ,
            RABBITMQ_CLUSTER_DIR=str(workdir),
            RABBITMQ_CLUSTER_NODES=str(nodes),
            RABBITMQ_CLUSTER_PORT=str(self.base_port),
            RABBITMQ_CLUSTER_NAME=self.name,
            RABBITMQ_CLUSTER_LISTEN=listen,
        )

    def script(self, *args: str, timeout: float = 240.0, check: bool = True) -> str:
        """Run ``rabbitmq-cluster.sh ARGS`` for this cluster and return its output."""
        done = subprocess.run(
            [*self.prefix, "bash", str(SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise ClusterUnavailable(
                f"rabbitmq-cluster.sh {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
            )
        return done.stdout

    def start(self) -> None:
        self.script("start")

    def stop(self) -> None:
        self.script("stop", check=False)

    def port(self, n: int) -> int:
        return self.base_port + n - 1

    def node(self, n: int) -> str:
        return f"{self.name}{n}@localhost"

    def number(self, node: str) -> int:
        """Node name -> its number."""
        return int(node.split("@", 1)[0].removeprefix(self.name))

    def url(self, order: Sequence[int] | None = None, query: str = "") -> str:
        """The AMQP URL listing the nodes in ``order`` (all of them, in order, by default)."""
        hosts = ",".join(f"{self.host}:{self.port(n)}" for n in (order or range(1, self.nodes + 1)))
        return f"amqp://guest:guest@{hosts}/{'?' + query if query else ''}"

    def kill(self, n: int) -> None:
        """SIGKILL node ``n``."""
        self.script("kill-node", str(n))

    def start_node(self, n: int) -> None:
        self.script("start-node", str(n))

    def running(self, n: int) -> bool:
        return f"{self.node(n)} running" in self.script("status", check=False)

    def ctl_json(self, *args: str, via: int | None = None) -> Any:
        """``rabbitmqctl ARGS --formatter json`` against a running node (``via``, or the first that answers)."""
        candidates = [via] if via is not None else list(range(1, self.nodes + 1))
        errors = []
        for n in candidates:
            try:
                text = self.script("ctl", str(n), "-q", *args, "--formatter", "json", timeout=60)
                return json.loads(text or "null")
            except (ClusterUnavailable, ValueError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        raise AssertionError(f"no node answered rabbitmqctl {' '.join(args)}: {errors}")

    def queue(self, name: str) -> dict[str, Any]:
        """``leader``, ``members`` and ``online`` of quorum queue ``name``."""
        for row in self.ctl_json("list_queues", "name", "leader", "members", "online"):
            if row["name"] == name:
                return dict(row)
        raise AssertionError(f"queue {name!r} not found on the cluster")

    def connection_nodes(self) -> dict[str, int]:
        """Client connection name -> number of the node it is connected to (known by the node's port)."""
        found: dict[str, int] = {}
        for row in self.ctl_json("list_connections", "port", "client_properties"):
            props = {entry[0]: entry[2] for entry in row["client_properties"]}
            name = props.get("connection_name")
            if isinstance(name, str):
                found[name] = row["port"] - self.base_port + 1
        return found
