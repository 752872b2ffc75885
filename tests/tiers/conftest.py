"""Fixtures shared by the tier tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 3-master Redis Cluster on loopback, one per test module that asks for it."""
    from kvtier.bench.redis_servers import RedisClusterServers

    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield servers
    servers.stop()
