"""The throw-away Redis servers of the fault tests: a server handed out is the child that serves its
port (so pausing or killing it takes the port down), and a cluster's nodes never share a port."""

import itertools

import pytest

from kvtier.bench import redis_servers
from kvtier.bench.redis_servers import RedisClusterServers, RedisServer, redis_server_available

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")


def test_a_port_served_by_another_redis_is_refused_not_handed_out(tmp_path):
    first = RedisServer(tmp_path / "a").start()
    try:
        # another redis answers PING on the port: start() must not mistake it for its own child
        second = RedisServer(tmp_path / "b", port=first.port)
        with pytest.raises(RuntimeError, match="another process|exited"):
            second.start()
        assert second.proc is None or second.proc.poll() is not None
        assert first.cli("PING").strip() == "PONG"  # the first server is untouched
    finally:
        first.stop()


def test_cluster_nodes_never_draw_each_others_port_or_bus_port(tmp_path, monkeypatch):
    # the draws repeat a port and hit another node's bus port: each node must draw again
    draws = itertools.chain([21000, 21000, 31000, 22000, 21000, 31000, 22000, 23000], itertools.repeat(24000))
    monkeypatch.setattr(redis_servers._rng, "randint", lambda lo, hi: next(draws))
    monkeypatch.setattr(redis_servers, "_port_free", lambda port: True)
    nodes = RedisClusterServers(tmp_path).nodes
    assert [n.port for n in nodes] == [21000, 22000, 23000]


def test_a_started_cluster_node_is_served_by_its_own_child(tmp_path):
    cluster = RedisClusterServers(tmp_path).start()
    try:
        assert len({n.port for n in cluster.nodes}) == 3
        for node in cluster.nodes:
            assert f"process_id:{node.proc.pid}" in node.cli("INFO", "server")
    finally:
        cluster.stop()
