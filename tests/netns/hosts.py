"""Hosts apart on one machine: network namespaces joined by veth pairs, made and removed by the tests (root only).

The broker namespace is the hub: one veth pair per client host, each a /24 of its own from 10.231.0.0/16 that
exists only inside these namespaces (no address, route or traffic in the machine's own namespace).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no permission): tests skip with this."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One client namespace: ``address`` is its own, ``broker_address`` the hub's end of its link."""

    namespace: str
    link: str  # its end of the veth pair
    hub_link: str  # the hub's end
    address: str
    broker_address: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def cut(self) -> None:
        """Take this host's link down: its packets go nowhere, its connect calls fail."""
        ip("-n", self.namespace, "link", "set", self.link, "down")

    def restore(self) -> None:
        ip("-n", self.namespace, "link", "set", self.link, "up")


@dataclass
class Network:
    """A broker namespace and client namespaces; :meth:`remove` kills what runs in them and deletes them."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    broker: str = ""
    hosts: list[Host] = field(default_factory=list)
    made: list[str] = field(default_factory=list)

    def build(self, clients: int) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the ip command (iproute2) is not installed")
        self.broker = self._namespace("b")
        for i in range(1, clients + 1):
            namespace = self._namespace(f"h{i}")
            link, hub_link = f"ts{self.tag}h{i}", f"ts{self.tag}b{i}"
            ip("link", "add", link, "type", "veth", "peer", "name", hub_link)
            ip("link", "set", link, "netns", namespace)
            ip("link", "set", hub_link, "netns", self.broker)
            host = Host(namespace, link, hub_link, f"10.231.{i}.2", f"10.231.{i}.1")
            ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", link)
            ip("-n", self.broker, "addr", "add", f"{host.broker_address}/24", "dev", hub_link)
            ip("-n", namespace, "link", "set", link, "up")
            ip("-n", self.broker, "link", "set", hub_link, "up")
            self.hosts.append(host)

    def _namespace(self, role: str) -> str:
        name = f"ts{self.tag}{role}"
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def remove(self) -> None:
        """SIGKILL whatever still runs in the namespaces (all started by the test), then delete them."""
        for name in self.made:
            pids = ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in self.made:
            ip("netns", "delete", name, check=False)
        self.made.clear()
