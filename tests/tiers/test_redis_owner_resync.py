"""Owner-managed Redis tier: two ways the owner's view fell out of step with the servers.

- After a server restart, a periodic reconcile kept the old stream position: the reconcile set a
  new epoch key (the old one was lost with the data) and took it as its own, so the step's replay
  no longer saw the restart and read on from the old stream's last id, past the new stream's
  records. A restart from an RDB snapshot (the epoch key restored, the stream and the keys older
  than the owner's view) went unnoticed with no periodic reconcile at all.
- A rescan during resharding skipped a key whose STRLEN answered MOVED (or ASK) until the next
  rescan: the key was not accounted, and the tier stayed past capacity meanwhile.
"""

from __future__ import annotations

import time

import pytest

from kvtier.bench.redis_servers import RedisServer, redis_server_available
from kvtier.tiers.redis import RedisTier
from tests.conftest import CHUNK, TINY
from tests.tiers.test_redis import keys_for, wait_for, write_chain
from tests.tiers.test_redis_owner import ocfg, stored

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")


def _answers(tier: RedisTier, keys: list[bytes]) -> bool:
    """Whether the tier reaches its server again (its pooled connections died with the server)."""
    tier.lookup(keys)
    return not tier.breaker_open()


# -- a server restart -----------------------------------------------------------------------------
def test_a_periodic_rescan_after_a_server_restart_reads_the_new_stream_from_its_start(tmp_path):
    server = RedisServer(tmp_path).start()
    owner = RedisTier(TINY, CHUNK, ocfg(server.url, 4, owner=True, rescan_s=3600.0))
    host = RedisTier(TINY, CHUNK, ocfg(server.url, 100, owner=False))
    try:
        x, y, z = keys_for(4, salt=801), keys_for(4, salt=802), keys_for(4, salt=803)
        write_chain(host, x)
        host.owner_step()
        assert owner.owner_step().chunks == 4
        # the old stream's ids run ahead of the restarted server's clock (a server whose clock was
        # set back, or a restart on another machine): an entry the owner reads and ignores
        stream = owner._access.stream.decode()  # type: ignore[union-attr]
        server.cli("XADD", stream, f"{int(time.time() * 1000) + 3_600_000}-0", "note", "clock ahead")
        owner.owner_step()
        server.restart()  # empty: the chunks, the stream and the epoch key are gone
        assert wait_for(lambda: _answers(host, x))
        write_chain(host, y)
        host.owner_step()
        owner._access._next_rescan = 0.0  # type: ignore[union-attr]  # the periodic reconcile is due now
        assert wait_for(lambda: owner.owner_step().rescans == 2)  # it ran (after a step that met a dead socket)
        write_chain(host, z)  # read from the stream only: no reconcile is due before an hour
        host.owner_step()
        report = owner.owner_step()
        sy, sz = stored(server, host, y), stored(server, host, z)
        print(report, "y", sy, "z", sz)
        assert sum(sy) + sum(sz) == 4, f"capacity 4 but {sum(sy) + sum(sz)} stored (y={sy}, z={sz}): {report}"
        assert sz == [True] * 4  # the newer chain stays; the owner read its saves
        assert report.resyncs == 1, report
    finally:
        host.close()
        owner.close()
        server.stop()


@pytest.mark.parametrize("snapshot", ["older_stream", "same_stream"])
def test_a_server_restarted_from_an_older_snapshot_is_rescanned(tmp_path, snapshot):
    """The snapshot holds chain x: taken before chain y's records (the restarted stream is older
    than the owner's position), or between the owner's replay of them and its deletes of x (the
    same stream: only the server's run_id tells the owner that x is back)."""
    server = RedisServer(tmp_path).start()
    owner = RedisTier(TINY, CHUNK, ocfg(server.url, 4, owner=True, rescan_s=0.0))  # no periodic reconcile
    host = RedisTier(TINY, CHUNK, ocfg(server.url, 100, owner=False))
    try:
        x, y, z = keys_for(4, salt=811), keys_for(4, salt=812), keys_for(4, salt=813)
        write_chain(host, x)
        host.owner_step()
        assert owner.owner_step().chunks == 4
        if snapshot == "older_stream":
            assert "OK" in server.cli("SAVE")
        else:
            access = owner._access
            assert access is not None
            real_trim = access._trim

            def save_then_trim():
                assert "OK" in server.cli("SAVE")
                real_trim()

            access._trim = save_then_trim  # type: ignore[method-assign]
        write_chain(host, y)
        host.touch(y)
        host.owner_step()
        assert owner.owner_step().evicted == 4  # x went for y
        if snapshot == "same_stream":
            access._trim = real_trim  # type: ignore[method-assign]
        server.restart()  # loads the snapshot: x is back, y is gone
        assert stored(server, host, x) == [True] * 4
        assert wait_for(lambda: _answers(host, x))
        write_chain(host, z)
        host.owner_step()
        assert wait_for(lambda: owner.owner_step().synced and not owner.breaker_open())
        report = owner.owner_step()
        sx, sy, sz = stored(server, host, x), stored(server, host, y), stored(server, host, z)
        print(report, "x", sx, "y", sy, "z", sz)
        assert sum(sx) + sum(sy) + sum(sz) == 4, f"capacity 4 but x={sx} y={sy} z={sz} stored: {report}"
        assert sz == [True] * 4
        assert report.resyncs == 1, report
    finally:
        host.close()
        owner.close()
        server.stop()


# -- resharding (a real 3-master cluster) ------------------------------------------------------------
def _node_ids(cluster) -> dict[int, str]:
    lines = cluster.nodes[0].cli("CLUSTER", "NODES").splitlines()
    return {n.port: next(line.split()[0] for line in lines if line.split()[1].startswith(f"127.0.0.1:{n.port}@"))
            for n in cluster.nodes}


def _chunks_stored(cluster, tier: RedisTier) -> int:
    """This tier's chunk keys on every master (KEYS is never redirected: a key mid-migration counts)."""
    pattern = tier._prefix.decode() + "*"
    return sum(len(n.cli("KEYS", pattern).split()) for n in cluster.nodes)


def _reshard_heads(cluster, owner: RedisTier, heads: list[bytes], finish: bool) -> list[tuple[str, int]]:
    """Move each head's slot to another master behind the owner's slot map: the whole way (the
    owner's next STRLEN answers MOVED) or only the key, the slot still migrating (ASK). Each
    moved slot and its destination port (those left migrating are for _finish)."""
    ids = _node_ids(cluster)
    by_port = {n.port: n for n in cluster.nodes}
    stream_slot = owner._cluster.keyslot(owner._access.stream)  # type: ignore[union-attr]
    pending = []
    for key in heads:
        rkey = owner.redis_key(key)
        slot = owner._cluster.keyslot(rkey)
        if slot == stream_slot:
            continue
        src = by_port[int(owner._route_of(rkey).name.rsplit(":", 1)[1])]  # type: ignore[union-attr]
        dst = next(n for n in cluster.nodes if n is not src)
        dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[src.port])
        src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[dst.port])
        assert "OK" in src.cli("MIGRATE", "127.0.0.1", str(dst.port), rkey.decode(), "0", "5000")
        pending.append((str(slot), dst.port))
        if finish:
            _finish(cluster, pending[-1:], ids)
    return pending


def _finish(cluster, slots: list[tuple[str, int]], ids: dict[int, str] | None = None) -> None:
    ids = ids or _node_ids(cluster)
    for slot, port in slots:
        for node in cluster.nodes:
            node.cli("CLUSTER", "SETSLOT", slot, "NODE", ids[port])


@pytest.mark.parametrize("finish", [True, False], ids=["moved", "ask"])
def test_a_rescan_during_resharding_accounts_keys_answered_moved_or_ask(cluster, finish):
    for node in cluster.nodes:
        node.cli("FLUSHALL")
    host = RedisTier(TINY, CHUNK, ocfg(cluster.url, 100, owner=False, cluster=True))
    keys = keys_for(12, salt=820 + finish)
    write_chain(host, keys)
    host.owner_step()
    owner = RedisTier(TINY, CHUNK, ocfg(cluster.url, 4, owner=True, cluster=True, rescan_s=0.0))
    # the heads (kept: the owner evicts tails first) move while the owner starts, its slot map stale
    moved = _reshard_heads(cluster, owner, keys[:4], finish)
    assert moved
    try:
        report = owner.owner_step()  # the owner's first rescan
        for _ in range(3):
            report = owner.owner_step()
            time.sleep(0.1)
        n = _chunks_stored(cluster, owner)
        print(report, "stored", n)
        assert report.chunks == 4 and n == 4, f"capacity 4 but {n} stored; owner accounts {report.chunks}: {report}"
    finally:
        if not finish:
            _finish(cluster, moved)
        owner.close()
        host.close()


def test_a_key_a_rescan_could_not_follow_is_asked_again_until_it_answers(cluster, monkeypatch):
    for node in cluster.nodes:
        node.cli("FLUSHALL")
    host = RedisTier(TINY, CHUNK, ocfg(cluster.url, 100, owner=False, cluster=True))
    keys = keys_for(12, salt=830)
    write_chain(host, keys)
    host.owner_step()
    owner = RedisTier(TINY, CHUNK, ocfg(cluster.url, 4, owner=True, cluster=True, rescan_s=0.0))
    access = owner._access
    assert access is not None
    moved = _reshard_heads(cluster, owner, keys[:4], finish=True)
    unread_before: list[int] = []
    real_read_unread = access._read_unread

    def read_unread():
        unread_before.append(len(access._unread))
        real_read_unread()

    monkeypatch.setattr(access, "_read_unread", read_unread)
    try:
        with monkeypatch.context() as mp:  # the node a MOVED names is not in the owner's slot map yet
            mp.setattr(owner, "_route_at", lambda host, port: None)
            owner.owner_step()
        assert unread_before == [len(moved)]  # the rescan left them unread, not skipped
        for _ in range(20):  # the slot map reloads in the background; a step reads the heads then
            report = owner.owner_step()
            if not access._unread:
                break
            time.sleep(0.1)
        n = _chunks_stored(cluster, owner)
        print(report, "stored", n, "unread before each step's retry", unread_before)
        assert not access._unread and report.chunks == 4 and n == 4, (n, report)
        assert owner.lookup(keys) == 4  # the heads stayed, the tails went
    finally:
        owner.close()
        host.close()
