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


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One Redis server on loopback, one per test module that asks for it."""
    from kvtier.bench.redis_servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
