"""The private three-node RabbitMQ cluster of the cluster tests: started once, stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.nodes import ClusterUnavailable, ScriptCluster
from tests.support.require import unavailable


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptCluster]:
    """Three private nodes joined with ``rabbitmqctl join_cluster`` on free ports (skips where it cannot run)."""
    made = ScriptCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), 3)
    try:
        made.start()
    except ClusterUnavailable as exc:
        made.stop()
        unavailable(f"a private RabbitMQ cluster cannot run here: {exc}")
    try:
        yield made
    finally:
        made.stop()
