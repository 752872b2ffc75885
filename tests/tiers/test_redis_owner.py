"""The Redis tier's owner-managed mode (capacity_bytes > 0) against real redis-server processes on
loopback: the owner replays every host's access records from a Redis Stream into kvtier's policy
and deletes victims; non-owners only append. Tests drive the owner's steps by hand (owner_step)
with a long flush_s, so the background thread stays out of the way; one test lets it run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from kvtier.bench.redis_servers import RedisServer, redis_server_available  # noqa: E402
from kvtier.core.config import LowerTierConfig, MemoryTierConfig, RedisTierConfig, StoreConfig  # noqa: E402
from kvtier.core.errors import ConfigError  # noqa: E402
from kvtier.store import TieredStore  # noqa: E402
from kvtier.tiers import redis_owner  # noqa: E402
from kvtier.tiers.base import TierWriteError  # noqa: E402
from kvtier.tiers.redis import RedisTier  # noqa: E402
from kvtier.tiers.redis_owner import Hits, OwnerView, Save, coalesce, decode_entry, encode_record  # noqa: E402
from tests.conftest import CHUNK, TINY, payload  # noqa: E402
from tests.tiers.test_redis import (  # noqa: E402
    TIMEOUT_S,
    keys_for,
    metas_for,
    read_all,
    timed,
    wait_for,
    write_chain,
)

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")

SLOW = 3600.0  # flush_s of tests that step by hand


def ocfg(url: str, capacity_chunks: int, owner: bool, **kw) -> RedisTierConfig:
    base = dict(url=url, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, backoff_s=0.2, max_backoff_s=0.4,
                breaker_failures=2, capacity_bytes=capacity_chunks * VALUE_BYTES, owner=owner, flush_s=SLOW,
                rescan_s=0.0, policy="lru")
    base.update(kw)
    return RedisTierConfig(**base)


def _value_bytes() -> int:
    meta = metas_for(keys_for(1, salt=999))[0]
    return len(RedisTier.encode.__get__(_Encoder())(meta, payload(meta.key)))


class _Encoder:
    """Just enough of a RedisTier to run its encode() without a server."""

    layout = TINY
    _layout_id = TINY.layout_id(CHUNK)
    layer_bytes = TINY.layer_bytes(CHUNK)


VALUE_BYTES = _value_bytes()


@pytest.fixture
def srv(shared_server):
    shared_server.cli("FLUSHALL")
    return shared_server


def stored(srv, tier, keys) -> list[bool]:
    return [srv.cli("EXISTS", tier.redis_key(k).decode()).strip() == "1" for k in keys]


# -- pure parts -----------------------------------------------------------------------------------
def test_records_round_trip_and_foreign_entries_are_ignored():
    save = Save(b"k" * 16, b"p" * 16, 3, 12345)
    assert decode_entry(encode_record(save)) == [save]
    root = Save(b"k" * 16, None, 0, 1)
    assert decode_entry(encode_record(root)) == [root]
    hits = Hits((b"a" * 8, b"b" * 8))
    assert decode_entry(encode_record(hits)) == [hits]
    assert decode_entry([b"op", b"x"]) == []
    assert decode_entry([b"op", b"h", b"w", b"3", b"k", b"abcd"]) == []  # not a whole number of keys
    assert decode_entry([b"op", b"h", b"w", b"1", b"k", b"abcd", b"r", b"1,2"]) == []  # counts do not add up
    assert decode_entry([b"something", b"else"]) == []


def test_consecutive_hit_records_share_one_entry_in_order():
    h1, h2, h3 = Hits((b"a" * 8,)), Hits((b"b" * 8, b"c" * 8)), Hits((b"d" * 8,))
    s1 = Save(b"k" * 16, None, 0, 1)
    entries = coalesce([encode_record(r) for r in (h1, h2, s1, h3)])
    assert len(entries) == 3
    assert [r for e in entries for r in decode_entry(e)] == [h1, h2, s1, h3]
    many = coalesce([encode_record(h1)] * 5, max_runs=2)
    assert len(many) == 3 and [r for e in many for r in decode_entry(e)] == [h1] * 5


def test_owner_view_evicts_tails_first_to_capacity():
    view = OwnerView("lru", capacity_bytes=300)
    chain = [bytes([i]) * 16 for i in range(4)]
    parent = None
    for depth, key in enumerate(chain):
        assert view.save(Save(key, parent, depth, 100))
        parent = key
    assert view.used == 400
    assert view.victims() == [chain[3]]  # the tail, though it is the newest
    assert view.used == 300 and chain[3] not in view


def test_hit_records_carry_key_prefixes_the_owner_maps_back():
    view = OwnerView("lru", capacity_bytes=200)
    a, b = b"\x01" * 32, b"\x02" * 32
    view.save(Save(a, None, 0, 100))
    view.save(Save(b, None, 0, 100))
    view.save(Save(b"\x03" * 32, None, 0, 100))
    view.hits(decode_entry(encode_record(Hits((a[:redis_owner.HIT_KEY_BYTES], b"\x09" * 8))))[0])  # type: ignore[arg-type]
    assert view.victims() == [b]  # a was touched through its prefix; the unknown prefix is ignored
    assert b[:redis_owner.HIT_KEY_BYTES] not in view.by_prefix


def test_touch_interval_records_a_hosts_hit_on_a_chunk_once_per_interval(srv):
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=False, touch_interval_s=3600.0))
    keys = keys_for(3, salt=23)
    host.touch(keys)
    host.touch(keys[:2])
    host.touch(keys)
    assert host._access is not None and len(host._access._buffer) == 1
    every = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=False))  # the default, 0: every hit
    every.touch(keys)
    every.touch(keys)
    assert every._access is not None and len(every._access._buffer) == 2
    host.close()
    every.close()


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="owner.*capacity_bytes"):
        RedisTierConfig(url="redis://127.0.0.1:6379", owner=True)
    with pytest.raises(ConfigError, match="ttl_s"):
        RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1 << 30, ttl_s=60)
    with pytest.raises(ConfigError, match="redis.policy"):
        RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1 << 30, policy="mru")
    with pytest.raises(ConfigError, match="redis.stream_maxlen"):
        RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1 << 30, stream_maxlen=10)
    with pytest.raises(ConfigError, match="redis.owner_lease_s"):
        RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1 << 30, owner=True, owner_lease_s=0)
    with pytest.raises(ConfigError, match="redis.flush_s"):
        RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1 << 30, flush_s=0)
    assert RedisTierConfig(url="redis://127.0.0.1:6379").mode == "server"  # the default is unchanged
    assert RedisTierConfig(url="redis://127.0.0.1:6379", capacity_bytes=1).mode == "owner"


# -- against a server -----------------------------------------------------------------------------
def test_owner_evicts_to_capacity_with_kvtiers_policy_tails_first(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True))
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=False))
    a, b = keys_for(4, salt=1), keys_for(4, salt=2)
    write_chain(host, a)
    host.owner_step()  # the non-owner sends its records; it never evicts
    write_chain(owner, b)
    assert stored(srv, owner, a + b) == [True] * 8
    report = owner.owner_step()
    assert report.synced and report.evicted == 2 and report.used_bytes == 6 * VALUE_BYTES
    # LRU over chains: chain a is older; its two tails go, its head stays (leaves before parents)
    assert stored(srv, owner, a) == [True, True, False, False]
    assert stored(srv, owner, b) == [True] * 4
    assert owner.lookup(a) == 2 and owner.usage().used_bytes == 6 * VALUE_BYTES
    host.close()
    owner.close()


def test_a_non_owners_hits_keep_its_chunks_alive(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True))
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=False))
    a, b, c = keys_for(3, salt=3), keys_for(3, salt=4), keys_for(3, salt=5)
    write_chain(owner, a)
    write_chain(owner, b)
    owner.owner_step()
    # the non-owner hits chain a (a lookup through the store touches it): a is now fresher than b
    assert host.lookup(a) == 3
    host.touch(a)
    host.owner_step()
    write_chain(owner, c)
    owner.owner_step()
    assert stored(srv, owner, a) == [True] * 3
    assert stored(srv, owner, b) == [False] * 3
    assert stored(srv, owner, c) == [True] * 3
    # without the non-owner's record, a would have gone first: the same run with no touch
    srv.cli("FLUSHALL")
    owner2 = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True))
    write_chain(owner2, a)
    write_chain(owner2, b)
    owner2.owner_step()
    assert host.lookup(a) == 3  # a lookup alone is no hit: only touch() records one
    write_chain(owner2, c)
    owner2.owner_step()
    assert stored(srv, owner2, a) == [False] * 3 and stored(srv, owner2, b) == [True] * 3
    for t in (host, owner, owner2):
        t.close()


def test_hits_through_a_store_reach_the_owner(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 6, owner=True))
    store = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=TINY.chunk_bytes(CHUNK)),
                                    lower_tiers=(LowerTierConfig(redis=ocfg(srv.url, 6, owner=False)),)), TINY)
    a, b, c = keys_for(3, salt=6), keys_for(3, salt=7), keys_for(3, salt=8)
    store.save(a, metas_for(a)[0].parent, 0, [payload(k) for k in a]).wait()
    store.flush()
    write_chain(owner, b)
    owner.owner_step()
    lower = store.lower_tiers[0]
    assert store.lookup(a).hits == 3  # one chunk of DRAM: the rest of a is found in Redis and touched
    lower.owner_step()
    write_chain(owner, c)
    report = owner.owner_step()
    assert report.evicted == 3
    assert stored(srv, owner, b) == [False] * 3 and stored(srv, owner, c) == [True] * 3
    assert stored(srv, owner, a)[1:] == [True, True]
    store.close()
    owner.close()


def test_owner_restart_rebuilds_from_the_keys(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=True))
    a, b = keys_for(5, salt=9), keys_for(3, salt=10)
    write_chain(owner, a)
    write_chain(owner, b)
    owner.owner_step()
    owner.close()
    # a value that is not a kvtier chunk under a chunk's name: the rebuild drops it
    srv.cli("SET", owner.redis_key(keys_for(1, salt=11)[0]).decode(), "garbage")
    again = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True))  # restarted with less room
    report = again.owner_step()
    assert report.rescans == 1 and report.corrupt == 1
    assert report.chunks == 4 and report.evicted == 4
    # the rebuilt view knows the chains: tails went first, each chain keeps its head run
    assert again.lookup(a) + again.lookup(b) == 4
    assert sum(stored(srv, again, a + b)) == 4
    again.close()


def test_stream_trimmed_past_the_owner_resyncs_by_rescan(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=True))
    owner.owner_step()
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=False, stream_maxlen=1000))
    keys = keys_for(3, salt=12)
    write_chain(host, keys)
    host.owner_step()
    stream = owner._access.stream.decode()  # type: ignore[union-attr]
    for _ in range(3):  # records the owner has not read, then trimmed away past its last id
        host.touch(keys)
        host.owner_step()
    srv.cli("XTRIM", stream, "MAXLEN", "0")
    report = owner.owner_step()
    assert report.resyncs == 1 and report.rescans == 2
    assert report.chunks == 3  # the rescan found the chunks whose save records were lost
    assert owner.owner_step().resyncs == 1  # and it follows the stream again
    # a server that lost its data (FLUSHALL: the epoch key is gone) is a resync too
    srv.cli("FLUSHALL")
    report = owner.owner_step()
    assert report.resyncs == 2 and report.chunks == 0 and report.vanished == 3
    host.close()
    owner.close()


def test_periodic_rescan_adopts_unrecorded_chunks_and_forgets_vanished_ones(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 100, owner=True, rescan_s=1e-6))  # a rescan every step
    a = keys_for(3, salt=20)
    write_chain(owner, a)
    owner.owner_step()
    plain = RedisTier(TINY, CHUNK, ocfg(srv.url, 0, owner=False, capacity_bytes=0))  # server-managed: no records
    b = keys_for(2, salt=21)
    write_chain(plain, b)
    srv.cli("DEL", owner.redis_key(a[2]).decode())  # gone behind the owner's back
    report = owner.owner_step()
    assert report.rescans == 2 and report.resyncs == 0  # at start, then at this step
    assert report.chunks == 4 and report.vanished == 1 and report.used_bytes == 4 * VALUE_BYTES
    plain.close()
    owner.close()


def test_owner_down_nothing_is_evicted_then_it_catches_up(srv):
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=False))
    keys = keys_for(8, salt=13)
    write_chain(host, keys)
    host.owner_step()
    assert all(stored(srv, host, keys))  # no owner: nothing evicted (the server's maxmemory is the backstop)
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True))
    report = owner.owner_step()
    assert report.chunks == 4 and sum(stored(srv, host, keys)) == 4 and host.lookup(keys) == 4
    host.close()
    owner.close()


def test_a_second_owner_stands_by_and_takes_over_when_the_first_goes(srv):
    first = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True, owner_lease_s=0.3))
    second = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True, owner_lease_s=0.3))
    assert first.owner_step().leader
    keys = keys_for(6, salt=22)
    write_chain(second, keys)
    report = second.owner_step()  # its records are sent, but it neither replays nor evicts
    assert not report.leader and not report.synced and report.evicted == 0
    assert first.owner_step().evicted == 2
    # the first stops renewing (a hung or dead host): once its lease runs out the second takes over
    assert wait_for(lambda: second.owner_step().leader)
    assert second.owner_report().chunks == 4
    report = first.owner_step()
    assert not report.leader and report.lease_lost == 1  # and it stands by, evicting nothing
    # a planned stop gives the lease up at once
    second.close()
    assert first.owner_step().leader
    first.close()


def test_a_late_save_record_of_a_chunk_the_owner_adopted_and_evicted_is_not_saved_again(srv):
    """Bug (flaky test_background_thread_evicts_without_being_asked): a host writes a chunk, then
    flushes its record. An owner rescan between the two adopted the chunk from its scan and
    evicted it; the late record then added it back to the view, accounted but gone, and the
    owner evicted a real chunk to make room for it."""
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True))
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=False))
    keys = keys_for(8, salt=23)
    write_chain(host, keys[:7])
    host.owner_step()  # the records of chunks 0..6 are in the stream
    write_chain(host, keys[7:])  # chunk 7 is stored, its record still buffered on the host
    report = owner.owner_step()  # builds its view: 7 adopted from the scan; evicts the tail
    assert report.evicted == 4 and stored(srv, host, keys) == [True] * 4 + [False] * 4
    host.owner_step()  # 7's record arrives
    report = owner.owner_step()
    assert report.evicted == 4 and report.chunks == 4
    assert stored(srv, host, keys) == [True] * 4 + [False] * 4  # before: chunk 3 evicted for a phantom 7
    host.close()
    owner.close()


def test_background_thread_evicts_without_being_asked(srv):
    owner = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=True, flush_s=0.05))
    host = RedisTier(TINY, CHUNK, ocfg(srv.url, 4, owner=False, flush_s=0.05))
    keys = keys_for(8, salt=14)
    write_chain(host, keys)
    assert wait_for(lambda: sum(stored(srv, host, keys)) == 4)
    assert wait_for(lambda: owner.owner_report().evicted == 4)
    assert owner.owner_report().last_error == ""
    host.close()
    owner.close()


def test_dead_server_gives_misses_fast_and_records_wait(tmp_path, monkeypatch):
    server = RedisServer(tmp_path).start()
    try:
        host = RedisTier(TINY, CHUNK, ocfg(server.url, 100, owner=False))
        keys = keys_for(3, salt=15)
        write_chain(host, keys)
        server.kill()
        host.touch(keys)  # buffered: no round trip
        assert timed("owner mode, server killed: lookup", host.lookup, keys) == 0
        metas, _ = timed("owner mode, server killed: read", read_all, host, keys)
        assert metas == [None] * 3
        timed("owner mode, server killed: flush", host.owner_step)
        late = metas_for(keys_for(2, salt=18))
        with pytest.raises(TierWriteError):  # the write and the records it carries: not delivered, kept
            timed("owner mode, server killed: write", host.write, late[0], payload(late[0].key))
        owner = RedisTier(TINY, CHUNK, ocfg(server.url, 100, owner=True, start_degraded=True))
        assert not timed("owner mode, server killed: owner step", owner.owner_step).synced
        owner.close()
        # the first two saves' records went out with the next writes' pipelines; the last save's
        # and the hit record wait in the buffer
        assert host._access is not None and len(host._access._buffer) == 2
        monkeypatch.setattr(redis_owner, "MAX_BUFFERED", 4)  # a long outage: the buffer keeps the newest
        for _ in range(5):
            host.touch(keys)
        assert len(host._access._buffer) == 4 and host.owner_report().dropped == 3
        monkeypatch.undo()
        server.start()
        assert wait_for(lambda: (host.owner_step(), not host._access._buffer)[1])  # type: ignore[union-attr]
        host.close()
    finally:
        server.stop()


def test_paused_server_owner_and_hosts_wait_a_timeout_at_most_then_catch_up(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        owner = RedisTier(TINY, CHUNK, ocfg(server.url, 4, owner=True))
        host = RedisTier(TINY, CHUNK, ocfg(server.url, 4, owner=False))
        owner.owner_step()
        keys = keys_for(6, salt=19)
        write_chain(host, keys)
        server.pause()
        try:
            host.touch(keys[:2])
            for _ in range(3):
                assert timed("owner mode, server paused: lookup", host.lookup, keys) == 0
                timed("owner mode, server paused: host flush", host.owner_step)
                timed("owner mode, server paused: owner step", owner.owner_step)
        finally:
            server.resume()
        assert wait_for(lambda: (host.owner_step(), owner.owner_step().evicted == 2)[1])
        assert host.lookup(keys) == 4 and owner.owner_report().resyncs == 0
        host.close()
        owner.close()
    finally:
        server.stop()


def test_maxmemory_at_or_below_capacity_is_warned(tmp_path):
    server = RedisServer(tmp_path, extra=("--maxmemory", "1mb", "--maxmemory-policy", "allkeys-lru")).start()
    try:
        tier = RedisTier(TINY, CHUNK, ocfg(server.url, 10_000, owner=True))
        assert any("not above capacity_bytes" in w for w in tier.settings_warnings)
        tier.close()
    finally:
        server.stop()


# -- Redis Cluster ----------------------------------------------------------------------------------
def test_cluster_owner_scans_every_master_and_evicts(cluster):
    host = RedisTier(TINY, CHUNK, ocfg(cluster.url, 100, owner=False, cluster=True))
    keys = keys_for(24, salt=16)
    write_chain(host, keys)
    host.touch(keys[:4])
    host.owner_step()
    owner = RedisTier(TINY, CHUNK, ocfg(cluster.url, 10, owner=True, cluster=True))
    report = owner.owner_step()
    assert report.chunks == 10 and report.evicted == 14
    assert owner.lookup(keys) == 10  # the chain's head run stays whole
    more = keys_for(4, salt=17)
    write_chain(host, more)
    host.owner_step()  # the last save's record (the others went out with the next writes)
    report = owner.owner_step()  # the records through the stream's node, the DELs on every master
    assert report.chunks == 10 and report.evicted == 18 and owner.lookup(more) == 4
    host.close()
    owner.close()


# -- the fleet simulation's model, checked against the real tier ------------------------------------
def test_real_stores_over_an_owner_managed_tier_hit_exactly_as_the_fleet_simulation(srv):
    """Four TieredStores (1 host's DRAM each) over one owner-managed Redis tier replay a trace
    round-robin, every host's records flushed and the owner stepped after each request: the chunk
    hits equal simulate_fleet's with REDIS_OWNER_MODEL (the `redis_owner` column) exactly."""
    import numpy as np

    from kvtier.bench.fleet import REDIS_OWNER_MODEL, simulate_fleet
    from kvtier.bench.trace import HitCounts, distinct_chunks
    from kvtier.core.keys import Namespace
    from tests.bench.test_trace import random_trace

    hosts, requests = 4, random_trace(7, 300)
    distinct = distinct_chunks(requests)
    dram, shared = round(distinct * 2 / 100), round(distinct * 2 * hosts / 100)
    root = Namespace("fleet", TINY.layout_id(CHUNK)).root()
    stores = [TieredStore(StoreConfig(
        chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=dram * TINY.chunk_bytes(CHUNK)),
        lower_tiers=(LowerTierConfig(redis=ocfg(srv.url, shared, owner=h == 0, policy="guarded")),)), TINY)
        for h in range(hosts)]
    counts = HitCounts()
    for i, req in enumerate(requests):
        store = stores[i % hosts]
        keys = [(x + 1).to_bytes(32, "big") for x in req.hash_ids]
        n = store.lookup(keys).hits
        counts.add(0 if i < len(requests) // 2 else 1, req, n)
        if n:
            bufs = [[np.zeros(TINY.layer_bytes(CHUNK), np.uint8) for _ in range(TINY.num_layers)] for _ in range(n)]
            assert store.load_sync(keys[:n], bufs).loaded == n
        if n < len(keys):
            store.save(keys[n:], keys[n - 1] if n else root, n, [payload(k) for k in keys[n:]]).wait()
        store.flush()
        for s in stores[1:] + stores[:1]:  # the others' records, then the owner replays and evicts
            s.lower_tiers[0].owner_step()
    report = stores[0].lower_tiers[0].owner_report()
    assert report.chunks == shared and report.evicted > 0 and report.resyncs == 0
    assert REDIS_OWNER_MODEL.make_policy().name == "guarded"
    assert sum(counts.block_hits) > 100
    assert counts.block_hits == simulate_fleet(requests, hosts, dram, REDIS_OWNER_MODEL, shared).block_hits
    for s in stores:
        s.close()
