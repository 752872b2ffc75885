"""Owner-managed Redis tier faults an audit found:

- an owner stalled past its lease (a pause between its replay and its deletes) still deleted
  with its old view after a standby took over: two owners evicted at once, and a plain PEXPIRE
  could extend the other owner's lease;
- on a resharding cluster, an owner's DEL answered MOVED/ASK counted as "vanished": the chunk was
  forgotten and stayed stored, past capacity;
- with one cluster master lost, a due periodic rescan failed and every later step returned before
  replaying and evicting on the masters still up.
"""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.bench.redis_servers import redis_server_available
from kvtier.tiers.base import TierWriteError
from kvtier.tiers.redis import RedisTier
from tests.conftest import CHUNK, TINY, payload
from tests.tiers.test_redis import keys_for, metas_for, write_chain
from tests.tiers.test_redis_owner import ocfg, stored

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")


def test_an_owner_that_lost_its_lease_mid_step_deletes_nothing(shared_server):
    srv = shared_server
    srv.cli("FLUSHALL")
    a = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True, owner_lease_s=0.4))
    b = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True, owner_lease_s=0.4))
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=False))
    x, y = keys_for(4, salt=501), keys_for(4, salt=502)
    write_chain(host, x)
    host.owner_step()
    assert a.owner_step().leader and b.owner_step().leader is False
    write_chain(host, y)
    host.owner_step()

    gate, inside = threading.Event(), threading.Event()
    real_trim = a._access._trim

    def stalled_trim():
        inside.set()
        gate.wait(10)  # the owner stalls after its replay, before its DELs
        real_trim()

    a._access._trim = stalled_trim
    th = threading.Thread(target=a.owner_step)
    th.start()
    assert inside.wait(10)
    time.sleep(0.6)  # the lease (0.4 s) runs out
    host.touch(x)  # chain x is hit meanwhile
    host.owner_step()
    rb = b.owner_step()
    assert rb.leader and rb.evicted == 2
    gate.set()
    th.join(10)
    ra = a.owner_report()
    sx, sy = stored(srv, host, x), stored(srv, host, y)
    print("a", ra, "\nb", rb, "\nx", sx, "y", sy)
    for t in (a, b, host):
        t.close()
    assert ra.evicted == 0, "the owner that lost its lease deleted chunks"
    assert sum(sx) + sum(sy) == 6, f"capacity 6 but only {sum(sx) + sum(sy)} stored (x={sx}, y={sy})"


def _node_ids(cluster):
    src = cluster.nodes[0]
    lines = src.cli("CLUSTER", "NODES").splitlines()
    return {f"127.0.0.1:{n.port}": next(line.split()[0] for line in lines
                                          if line.split()[1].startswith(f"127.0.0.1:{n.port}@"))
            for n in cluster.nodes}


def _migrate(cluster, tier, rkey, src, dst, ids):
    slot = str(tier._cluster.keyslot(rkey))
    dst.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[f"127.0.0.1:{src.port}"])
    src.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[f"127.0.0.1:{dst.port}"])
    assert "OK" in src.cli("MIGRATE", "127.0.0.1", str(dst.port), rkey.decode(), "0", "5000")
    for node in cluster.nodes:
        node.cli("CLUSTER", "SETSLOT", slot, "NODE", ids[f"127.0.0.1:{dst.port}"])


def test_an_owner_delete_meeting_moved_is_tried_again(cluster):
    url = cluster.url
    owner = RedisTier(TINY, CHUNK, ocfg(url, 4, owner=True, cluster=True, rescan_s=0.0))
    host = RedisTier(TINY, CHUNK, ocfg(url, 4, owner=False, cluster=True))
    keys = keys_for(8, salt=4242)
    write_chain(host, keys[:4])
    host.owner_step()
    assert owner.owner_step().chunks == 4
    for meta in metas_for(keys)[4:]:  # the 4 tails (children of keys[3]), the owner's next victims
        assert host.write(meta, payload(meta.key))
    host.owner_step()
    ids = _node_ids(cluster)
    stream_node = owner._route_of(owner._access.stream).name
    by_port = {f"127.0.0.1:{n.port}": n for n in cluster.nodes}
    moved = 0
    for k in keys[4:]:  # reshard the victims' slots (not the stream's) to another master
        rkey = owner.redis_key(k)
        name = owner._route_of(rkey).name
        if name == stream_node:
            continue
        src = by_port[name]
        dst = next(n for n in cluster.nodes if n is not src)
        _migrate(cluster, owner, rkey, src, dst, ids)
        moved += 1
    assert moved
    for _ in range(5):
        report = owner.owner_step()
    present = []
    for k in keys:  # ask every master (with redis-cli, no slot map): is the value stored anywhere?
        rk = owner.redis_key(k).decode()
        present.append(any(n.cli("EXISTS", rk).strip() == "1" for n in cluster.nodes))
    print("report", report, "present", present)
    owner.close()
    host.close()
    assert sum(present) <= 4, f"{sum(present)} chunks stored, capacity 4; owner thinks {report.chunks} (vanished={report.vanished})"


def test_a_lost_master_does_not_stop_eviction_on_the_others(cluster):
    owner = RedisTier(TINY, CHUNK, ocfg(cluster.url, 4, owner=True, cluster=True, rescan_s=0.5,
                                        timeout_s=0.3, connect_timeout_s=0.3))
    host = RedisTier(TINY, CHUNK, ocfg(cluster.url, 4, owner=False, cluster=True))
    assert owner.owner_step().synced
    stream_node = owner._route_of(owner._access.stream).name
    victim = next(n for n in cluster.nodes if f"127.0.0.1:{n.port}" != stream_node)
    victim.kill()
    try:
        written = []
        for salt in range(600, 700):  # root chunks that live on the masters still up
            k = keys_for(1, salt=salt)
            if host._route_of(host.redis_key(k[0])).name == f"127.0.0.1:{victim.port}":
                continue
            meta = metas_for(k)[0]
            try:
                host.write(meta, payload(meta.key))
                written.append(k[0])
            except TierWriteError:
                pass
            if len(written) == 12:
                break
        host.owner_step()
        time.sleep(0.6)  # a rescan is due
        for _ in range(4):
            report = owner.owner_step()
            time.sleep(0.1)
        live = [n for n in cluster.nodes if n is not victim]
        stored = sum(any(n.cli("EXISTS", owner.redis_key(k).decode()).strip() == "1" for n in live) for k in written)
        print(report, "stored", stored, "written", len(written))
        assert stored <= 4, f"capacity 4 chunks, {stored} stored on the live masters; report {report}"
    finally:
        owner.close()
        host.close()
        victim.restart()
