"""Fixtures of the network-namespace tests: the namespaces, and a private RabbitMQ node in the broker's one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.nodes import ClusterUnavailable, ScriptCluster
from tests.netns.hosts import NetnsUnavailable, Network
from tests.support.require import unavailable


@pytest.fixture
def network() -> Iterator[Network]:
    """A broker namespace and two client namespaces, removed after the test even when it fails."""
    made = Network()
    try:
        made.build(clients=2)
    except NetnsUnavailable as exc:
        made.remove()
        unavailable(f"network namespaces cannot be made here: {exc}")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def broker_node(network: Network, tmp_path: Path) -> Iterator[ScriptCluster]:
    """One private RabbitMQ node in the broker namespace, listening on its links (guest allowed from them)."""
    workdir = tmp_path / "rabbitmq"
    workdir.mkdir()
    node = ScriptCluster(workdir, 1, listen="0.0.0.0", prefix=["ip", "netns", "exec", network.broker])
    try:
        node.start()
    except ClusterUnavailable as exc:
        node.stop()
        unavailable(f"a private RabbitMQ node cannot run in a namespace here: {exc}")
    try:
        yield node
    finally:
        node.stop()
