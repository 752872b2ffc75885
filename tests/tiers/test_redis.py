"""The Redis tier against real servers: a redis-server per test (faults) or per module, and one
3-master Redis Cluster per module (cluster-require-full-coverage no: when a master is lost the
other masters' slots keep serving). Servers run on free loopback ports and keep nothing on disk.

Fault stalls are measured (wall time of the call that met the fault) and printed at the end of
the module; the tests assert that each call returned, a miss or verified data, never on time,
except a generous watchdog that turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("redis")

from kvtier.bench.redis_servers import RedisServer, redis_server_available  # noqa: E402
from kvtier.core import metrics as m  # noqa: E402
from kvtier.core.codec import SECTION_SUMMARY  # noqa: E402
from kvtier.core.config import (  # noqa: E402
    REDIS_RECOMMENDED_SETTINGS,
    LowerTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    StoreConfig,
)
from kvtier.core.errors import ConfigError, CorruptChunkError, TierUnavailableError  # noqa: E402
from kvtier.core.keys import Namespace, chunk_keys  # noqa: E402
from kvtier.core.layout import KVLayout  # noqa: E402
from kvtier.store import TieredStore  # noqa: E402
from kvtier.tiers.base import ChunkMeta, TierWriteError  # noqa: E402
from kvtier.tiers.redis import CircuitBreaker, RedisTier  # noqa: E402
from tests.conftest import CHUNK, TINY, payload  # noqa: E402

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")

ROOT = Namespace("test-model", TINY.layout_id(CHUNK)).root()
LB = TINY.layer_bytes(CHUNK)
TIMEOUT_S = 0.3  # every fault test's read and connect timeout
WATCHDOG_S = 15.0  # a call that takes longer than this is a hang, not a bounded stall
STALLS: dict[str, float] = {}  # fault -> worst measured stall (s)


@pytest.fixture(scope="module", autouse=True)
def _report_stalls(tmp_path_factory):
    yield
    if STALLS:
        path = tmp_path_factory.getbasetemp() / "redis_fault_stalls.json"
        path.write_text(json.dumps(STALLS, indent=1))
        print(f"\nredis fault stalls (s), timeouts {TIMEOUT_S} s: {json.dumps(STALLS)}")
        out = os.environ.get("KVTIER_REDIS_STALLS")
        if out:
            with open(out, "w") as f:
                json.dump({"timeout_s": TIMEOUT_S, "connect_timeout_s": TIMEOUT_S, "stalls_s": STALLS}, f)


def timed(fault: str, fn, *args):
    """Run fn in a thread; fail if it hangs, record its wall time as a stall of `fault`."""
    box: dict[str, object] = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            box["error"] = e

    t0 = time.perf_counter()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(WATCHDOG_S)
    took = time.perf_counter() - t0
    assert not th.is_alive(), f"{fault}: the call hung for {WATCHDOG_S} s"
    STALLS[fault] = max(STALLS.get(fault, 0.0), took)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def cfg(url: str, **kw) -> RedisTierConfig:
    base = dict(url=url, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, backoff_s=0.2, max_backoff_s=0.4,
                breaker_failures=2)
    base.update(kw)
    return RedisTierConfig(**base)


def keys_for(n_chunks: int, salt: int = 0) -> list[bytes]:
    return chunk_keys(ROOT, [salt * 100_000 + t for t in range(n_chunks * CHUNK)], CHUNK)


def metas_for(keys, extras=None) -> list[ChunkMeta]:
    from kvtier.core.codec import checksum

    out, parent = [], ROOT
    for depth, key in enumerate(keys):
        sums = tuple(checksum(p) for p in payload(key))
        out.append(ChunkMeta(key, parent, depth, CHUNK, sums, extras or ()))
        parent = key
    return out


def write_chain(tier, keys, extras=None) -> None:
    for meta in metas_for(keys, extras):
        assert tier.write(meta, payload(meta.key))


def dests(n: int, layers: int = TINY.num_layers):
    return [[np.zeros(LB, np.uint8) for _ in range(layers)] for _ in range(n)]


def assert_exact(keys, got, layers=None):
    for key, d in zip(keys, got):
        want = payload(key)
        for layer, buf in zip(layers if layers is not None else range(TINY.num_layers), d):
            assert np.array_equal(buf, want[layer])


def read_all(tier, keys):
    d = dests(len(keys))
    metas = tier.read_many(keys, list(range(TINY.num_layers)), d)
    return metas, d


def wait_for(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def tier(shared_server):
    shared_server.cli("FLUSHALL")
    t = RedisTier(TINY, CHUNK, cfg(shared_server.url))
    yield t
    t.close()


# -- behaviour on a healthy server -----------------------------------------------------------
def test_round_trip_lookup_and_whole_reads(tier):
    keys = keys_for(5)
    summary = ((SECTION_SUMMARY, 0, b"summary of layer 0"), (SECTION_SUMMARY, 1, b"layer 1"))
    write_chain(tier, keys, summary)
    assert tier.lookup(keys) == 5
    assert tier.contains(keys[2])
    metas, d = read_all(tier, keys)
    assert [mt.key for mt in metas] == keys
    assert metas[3].parent == keys[2] and metas[3].depth == 3
    assert metas[0].extras == summary  # a whole-chunk read returns the extra sections
    assert_exact(keys, d)
    assert tier.read_section(keys[1], SECTION_SUMMARY, 1) == b"layer 1"
    assert tier.read_section(keys[1], SECTION_SUMMARY, 7) is None
    assert tier.metrics.get(m.HITS, tier="redis") == 5
    assert tier.read_gbps() is not None and tier.read_gbps() > 0
    # idempotent: writing again stores nothing new
    before = tier.metrics.get(m.BYTES_WRITTEN, tier="redis")
    write_chain(tier, keys)
    assert tier.metrics.get(m.BYTES_WRITTEN, tier="redis") == before
    assert tier.delete(keys[4]) and not tier.delete(keys[4])
    assert tier.lookup(keys) == 4
    assert tier.usage().used_bytes > 0


def test_layer_wise_read_uses_getrange_of_that_layer_only(tier, shared_server):
    keys = keys_for(3, salt=1)
    write_chain(tier, keys, ((SECTION_SUMMARY, 0, b"x" * 100),))  # extras: the layers move
    write_chain(tier, keys_for(2, salt=2))  # and chunks without extras
    shared_server.cli("CONFIG", "RESETSTAT")
    for chain in (keys, keys_for(2, salt=2)):
        d = dests(len(chain), layers=1)
        metas = tier.read_many(chain, [1], d)
        assert all(mt is not None and mt.extras == () for mt in metas)
        assert_exact(chain, d, layers=[1])
    stats = shared_server.cli("INFO", "commandstats")
    assert "cmdstat_getrange" in stats and "cmdstat_get:" not in stats


def test_prefix_stops_at_the_first_gap(tier):
    keys = keys_for(6, salt=3)
    write_chain(tier, keys)
    tier.delete(keys[2])
    assert tier.lookup(keys) == 2
    assert tier.lookup(keys[3:]) == 3
    assert tier.lookup([]) == 0
    tier._scripted_lookup = False  # as after a server that refuses the lookup script: pipelined EXISTS
    assert tier.lookup(keys) == 2 and tier.lookup(keys[3:]) == 3


def test_a_chunk_whose_parent_the_server_evicted_is_never_served(tmp_path):
    # a server with room for ~40 chunks and LRU eviction; a chain of 150 chunks
    server = RedisServer(tmp_path, extra=("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")).start()
    try:
        tier = RedisTier(TINY, CHUNK, cfg(server.url))
        keys = keys_for(150, salt=4)
        for meta in metas_for(keys):
            tier.write(meta, payload(meta.key))
        assert "evicted_keys:0\r" not in server.cli("INFO", "stats")
        present = [tier.contains(k) for k in keys]
        n = tier.lookup(keys)
        assert all(present[:n]) and not present[n]
        assert any(present[n + 1:])  # children of the evicted chunk are still stored ...
        store = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=1 << 20),
                                        lower_tiers=(LowerTierConfig(redis=cfg(server.url)),)), TINY)
        assert store.lookup(keys).hits == n  # ... and never served as part of a prefix
        store.close()
        tier.close()
    finally:
        server.stop()


def test_the_servers_eviction_settings_are_checked_at_start(tmp_path, shared_server, caplog):
    # the shared server runs Redis's defaults: no maxmemory, noeviction
    with caplog.at_level("WARNING", logger="kvtier.tiers.redis"):
        tier = RedisTier(TINY, CHUNK, cfg(shared_server.url))
    assert any("maxmemory is 0" in w for w in tier.settings_warnings)
    assert any("noeviction never evicts" in w for w in tier.settings_warnings)
    assert "noeviction" in caplog.text
    tier.close()
    recommended = [a for k, v in REDIS_RECOMMENDED_SETTINGS.items() for a in (f"--{k}", v)]
    for extra, expected in (
            (("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"), ["maxmemory-samples 5 "]),
            (("--maxmemory", "8mb", *recommended), []),
            (("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lfu"), ["allkeys-lfu (kvtier recommends allkeys-lru)"])):
        server = RedisServer(tmp_path, extra=extra).start()
        try:
            tier = RedisTier(TINY, CHUNK, cfg(server.url))
            assert len(tier.settings_warnings) == len(expected)
            assert all(e in w for e, w in zip(expected, tier.settings_warnings))
            tier.close()
            # a server that refuses CONFIG (renamed away, as managed services do) is simply not checked
            server.cli("ACL", "SETUSER", "default", "-config")
            tier = RedisTier(TINY, CHUNK, cfg(server.url))
            assert tier.settings_warnings == [] and tier.lookup(keys_for(1)) == 0
            tier.close()
        finally:
            server.stop()


def test_bad_values_are_counted_misses(tier, shared_server):
    keys = keys_for(4, salt=5)
    write_chain(tier, keys)
    r = tier._single.client
    # a section's bytes overwritten inside Redis: verified miss, deleted, counted
    r.setrange(tier.redis_key(keys[0]), 4096 + 10, b"\xff\x00garbage")
    metas, d = read_all(tier, keys[:1])
    assert metas == [None]
    assert r.exists(tier.redis_key(keys[0])) == 0
    assert tier.metrics.get(m.CHECKSUM_FAILURES, tier="redis") == 1
    # not a kvtier chunk at all; and a value of another type (WRONGTYPE)
    r.set(tier.redis_key(keys[1]), b"hello")
    r.delete(tier.redis_key(keys[2]))
    r.rpush(tier.redis_key(keys[2]), b"a list")
    assert tier.read_many(keys[1:3], [0, 1], dests(2)) == [None, None]
    assert tier.read_many(keys[1:3], [1], dests(2, 1)) == [None, None]
    assert tier.metrics.get(m.CHECKSUM_FAILURES, tier="redis") == 3
    # a chunk of another layout under a colliding name: a counted miss, left for its owner
    other = RedisTier(KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float16"), CHUNK,
                      cfg(shared_server.url))
    value = other.encode(metas_for(keys[3:4])[0], [b"\0" * other.layer_bytes] * 2)
    r.delete(tier.redis_key(keys[3]))
    r.set(tier.redis_key(keys[3]), bytes(value))
    assert tier.read(keys[3], [0, 1], dests(1)[0]) is None
    assert tier.foreign_chunks == 1 and tier.metrics.get(m.FOREIGN_CHUNKS, tier="redis") == 1
    assert r.exists(tier.redis_key(keys[3])) == 1
    # a header whose key is another chunk's (a value copied under the wrong name)
    r.set(tier.redis_key(keys[0]), r.get(tier.redis_key(keys_for(1, salt=99)[0])) or bytes(
        tier.encode(metas_for(keys[1:2])[0], payload(keys[1]))))
    assert tier.read(keys[0], [0, 1], dests(1)[0]) is None
    other.close()


def test_ttl_expires_chunks(shared_server):
    tier = RedisTier(TINY, CHUNK, cfg(shared_server.url, ttl_s=30.0, namespace="ttl-test"))
    keys = keys_for(1, salt=6)
    write_chain(tier, keys)
    ttl_ms = tier._single.client.pttl(tier.redis_key(keys[0]))
    assert 0 < ttl_ms <= 30_000
    tier.close()


def test_a_value_evicted_between_a_reads_round_trips_is_a_miss_not_corruption(tier):
    """A read's header and layer GETRANGEs are not atomic: a value evicted between them leaves
    empty layer replies. That is a miss; before, it counted as corruption and sent a DEL (which
    could take a copy another host had just stored). A value still there and cut short is corrupt."""
    keys = keys_for(1, salt=41)
    write_chain(tier, keys)
    rkey = tier.redis_key(keys[0])
    r = tier._single.client
    header = r.getrange(rkey, 0, tier._kv_header - 1)
    views = [memoryview(d) for d in dests(1)[0]]
    replies = [header] + [b""] * TINY.num_layers
    with pytest.raises(CorruptChunkError, match="short value"):
        tier._unpack_layers(keys[0], rkey, replies, list(range(TINY.num_layers)), views)
    r.delete(rkey)  # evicted
    assert tier._unpack_layers(keys[0], rkey, replies, list(range(TINY.num_layers)), views) is None


def test_a_value_re_saved_between_a_reads_round_trips_is_not_deleted(tier):
    """A layer-wise read takes the header and the layers in separate commands. When another host
    replaces the value between them (an eviction, then a valid re-save of the same chunk with other
    bytes: KV computed on another GPU), the read sees one value's checksums over the other's bytes.
    That read is a counted miss, but the delete is conditional on the header the read saw, so the
    valid new value stays and the next read is served it. Before, a plain DEL dropped it."""
    from kvtier.core.codec import checksum

    keys = keys_for(1, salt=43)
    write_chain(tier, keys)
    rkey = tier.redis_key(keys[0])
    r = tier._single.client
    other_bytes = [np.ascontiguousarray(p[::-1]) for p in payload(keys[0])]  # another valid copy
    meta = metas_for(keys)[0]
    other = ChunkMeta(meta.key, meta.parent, meta.depth, meta.num_tokens,
                      tuple(checksum(b) for b in other_bytes))
    replacement = bytes(tier.encode(other, other_bytes))
    real = tier._pipelined
    swapped = []

    def interleaved(rkeys, commands):
        out = real(rkeys, commands)
        if not swapped:  # the read's header came from the old value, its layers from the new one
            swapped.append(True)
            r.set(rkey, replacement)
            again = real(rkeys, commands)
            out = [o[:1] + a[1:] for o, a in zip(out, again)]
        return out

    tier._pipelined = interleaved
    try:
        assert tier.read_many(keys, [1], dests(1, 1)) == [None]  # layer 1 alone: header, then GETRANGE
    finally:
        tier._pipelined = real
    assert swapped and tier.metrics.get(m.CHECKSUM_FAILURES, tier="redis") == 1
    assert r.get(rkey) == replacement  # kept
    got = dests(1, 1)
    assert tier.read_many(keys, [1], got)[0] is not None and np.array_equal(got[0][0], other_bytes[1])
    # the value the read saw, still there and corrupt: deleted (whole reads compare its length too)
    r.setrange(rkey, tier._kv_header + 5, b"\xff\xfe")
    seen = r.get(rkey)
    pieces = [(0, seen[:tier._kv_header]), (tier._kv_header, seen[tier._kv_header:])]
    tier._drop_corrupt(rkey, CorruptChunkError("test"), pieces, len(seen) + 1)  # another length: kept
    assert r.exists(rkey) == 1
    tier._drop_corrupt(rkey, CorruptChunkError("test"), pieces, len(seen))
    assert r.exists(rkey) == 0


def test_a_corrupt_value_dropped_and_saved_again_with_the_same_bytes_stays(tier):
    """Two readers find one corrupt value (a flipped bit in a section: its header intact); the
    first deletes it and a host saves the chunk again, byte for byte what it was before the flip.
    The second reader's delete compared the header and length only, both the same, and dropped
    the valid copy; it now also compares the section that failed (its SHA-1, in the script)."""
    keys = keys_for(1, salt=44)
    write_chain(tier, keys)
    rkey = tier.redis_key(keys[0])
    r = tier._single.client
    good = r.get(rkey)
    r.setrange(rkey, tier._kv_header + 7, bytes([good[tier._kv_header + 7] ^ 0xFF]))
    corrupt = r.get(rkey)
    with pytest.raises(CorruptChunkError) as late:  # the second reader's verdict, before it deletes
        tier._unpack_whole(keys[0], corrupt, [0, 1], [memoryview(d) for d in dests(1)[0]])
    assert read_all(tier, keys)[0] == [None] and r.exists(rkey) == 0  # the first reader drops it
    write_chain(tier, keys)  # saved again: the same bytes as before the flip
    assert r.get(rkey) == good
    tier._drop_corrupt(rkey, late.value)
    assert r.get(rkey) == good  # deleted before
    assert read_all(tier, keys)[0][0] is not None


def test_bad_config_and_servers_are_clear_errors_at_start(shared_server, tmp_path):
    for url in ("localhost:6379", "redis://", "redis://h:notaport", "http://h:1", "redis://h:1/db0", ""):
        with pytest.raises(ConfigError, match="url"):
            RedisTierConfig(url=url)
    with pytest.raises(ConfigError, match="timeout_s"):
        RedisTierConfig(url="redis://h:1", timeout_s=0)
    for ttl in (-1.0, 0.0005, float("nan")):  # 0.5 ms rounded to no expiry at all, silently (an audit found)
        with pytest.raises(ConfigError, match="ttl_s"):
            RedisTierConfig(url="redis://h:1", ttl_s=ttl)
    for namespace in (123, "", "a b"):  # 123: a TypeError before
        with pytest.raises(ConfigError, match="namespace"):
            RedisTierConfig(url="redis://h:1", namespace=namespace)
    with pytest.raises(TierUnavailableError, match="set cluster: true|Cluster"):
        # a plain server asked to be a cluster: redis-py's cluster discovery refuses it
        RedisTier(TINY, CHUNK, cfg(shared_server.url, cluster=True))
    dead = RedisServer(tmp_path)  # a free port nobody serves yet
    with pytest.raises(TierUnavailableError, match="cannot reach"):
        RedisTier(TINY, CHUNK, cfg(dead.url))


def test_a_password_server_refuses_missing_or_wrong_credentials_at_start(tmp_path):
    server = RedisServer(tmp_path, extra=("--requirepass", "s3cret")).start()
    try:
        for url in (server.url, server.url.replace("//", "//:wrong@")):
            with pytest.raises(TierUnavailableError, match="refused|credentials|NOAUTH|auth"):
                RedisTier(TINY, CHUNK, cfg(url, start_degraded=True))  # not an outage: refused even so
        tier = RedisTier(TINY, CHUNK, cfg(server.url.replace("//", "//:s3cret@")))
        keys = keys_for(2, salt=30)
        write_chain(tier, keys)
        assert tier.lookup(keys) == 2
        tier.close()
    finally:
        server.stop()


def test_start_degraded_then_recovers_when_the_server_appears(tmp_path):
    server = RedisServer(tmp_path)
    tier = RedisTier(TINY, CHUNK, cfg(server.url, start_degraded=True))
    keys = keys_for(2, salt=7)
    assert timed("server absent at start", tier.lookup, keys) == 0
    with pytest.raises(TierWriteError):
        tier.write(metas_for(keys)[0], payload(keys[0]))
    server.start()
    try:
        assert wait_for(lambda: _try_write(tier, keys))
        assert tier.lookup(keys) == 2
    finally:
        tier.close()
        server.stop()


def _try_write(tier, keys) -> bool:
    try:
        write_chain(tier, keys)
    except TierWriteError:
        return False
    return True


# -- faults on a single server -------------------------------------------------------------------
def test_killed_then_restarted_server(server):
    tier = RedisTier(TINY, CHUNK, cfg(server.url))
    keys = keys_for(4, salt=8)
    write_chain(tier, keys)
    server.kill()
    assert timed("server killed: lookup", tier.lookup, keys) == 0
    metas = timed("server killed: read", tier.read_many, keys, [0, 1], dests(4))
    assert metas == [None] * 4
    with pytest.raises(TierWriteError):
        timed("server killed: write", tier.write, metas_for(keys)[0], payload(keys[0]))
    assert tier.breaker_open()
    assert tier.metrics.get(m.TIER_UNAVAILABLE, tier="redis") > 0
    server.start()  # restarted empty (nothing kept on disk), without the lookup script
    assert wait_for(lambda: _try_write(tier, keys))
    assert tier.lookup(keys) == 4  # the script is loaded again on NOSCRIPT
    metas, d = read_all(tier, keys)
    assert all(mt is not None for mt in metas)
    assert_exact(keys, d)
    tier.close()


def test_paused_server_gives_misses_within_the_timeout_and_recovers(server):
    tier = RedisTier(TINY, CHUNK, cfg(server.url))
    keys = keys_for(3, salt=9)
    write_chain(tier, keys)
    server.pause()
    try:
        for _ in range(4):  # the first calls wait a timeout each; then the open breaker answers at once
            assert timed("server paused (SIGSTOP)", tier.lookup, keys) == 0
        assert tier.breaker_open()
        assert timed("server paused (SIGSTOP)", tier.read_many, keys, [0, 1], dests(3)) == [None] * 3
        with pytest.raises(TierWriteError):
            timed("server paused (SIGSTOP)", tier.write, metas_for(keys_for(1, salt=10))[0],
                  payload(keys_for(1, salt=10)[0]))
    finally:
        server.resume()
    assert wait_for(lambda: tier.lookup(keys) == 3)
    metas, d = read_all(tier, keys)
    assert_exact(keys, d)
    tier.close()


def test_client_kill_of_kvtier_connections(server):
    tier = RedisTier(TINY, CHUNK, cfg(server.url))
    keys = keys_for(3, salt=11)
    write_chain(tier, keys)
    assert tier.lookup(keys) == 3
    killed = int(server.cli("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").strip() or 0)
    assert killed >= 1
    # redis-py reconnects a pooled connection the server closed; at worst one call is a miss
    results = [timed("CLIENT KILL", tier.lookup, keys) for _ in range(3)]
    assert results[-1] == 3
    metas, d = read_all(tier, keys)
    assert_exact(keys, d)
    tier.close()


def test_circuit_breaker_backs_off_and_closes():
    now = [0.0]
    b = CircuitBreaker(2, backoff_s=1.0, max_backoff_s=3.0, clock=lambda: now[0])
    assert b.allow()
    b.failed()
    assert b.allow() and not b.is_open
    b.failed()
    assert b.is_open and not b.allow()
    now[0] = 1.0
    assert b.allow() and not b.allow()  # one trial at a time
    b.failed()  # the trial failed: twice the back-off
    now[0] = 2.5
    assert not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.failed()
    now[0] = 5.9
    assert not b.allow()  # capped at max_backoff_s = 3
    now[0] = 6.0
    assert b.allow()
    b.succeeded()
    assert not b.is_open and b.allow() and b.allow()
    # a trial whose caller never reports back (it raised) blocks others for one back-off only
    b.failed()
    b.failed()
    now[0] = 7.0
    assert b.allow() and not b.allow()
    now[0] = 8.0
    assert b.allow()


# -- through TieredStore: sharing across hosts ----------------------------------------------------
def redis_store(url: str, mem_chunks: int = 16, cluster: bool = False) -> TieredStore:
    return TieredStore(StoreConfig(
        chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=mem_chunks * TINY.chunk_bytes(CHUNK)),
        lower_tiers=(LowerTierConfig(redis=cfg(url, cluster=cluster)),)), TINY)


def test_a_chunk_saved_by_one_store_is_loaded_by_another(tier, shared_server):
    host_a, host_b = redis_store(shared_server.url), redis_store(shared_server.url)
    keys = keys_for(5, salt=12)
    host_a.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    host_a.flush()
    assert host_b.lookup(keys).tiers == ("redis",) * 5
    d = dests(5)
    res = host_b.load_sync(keys, d)
    assert res.loaded == 5 and res.tiers == ("redis",) * 5
    assert_exact(keys, d)
    assert host_b.lookup(keys).tiers == ("memory",) * 5  # promoted into host B's DRAM
    # a layer-wise load of another chain, straight from Redis
    more = keys_for(2, salt=13)
    host_a.save(more, ROOT, 0, [payload(k) for k in more]).wait()
    d1 = dests(2, 1)
    assert host_b.load_sync(more, d1, layers=[1]).loaded == 2
    assert_exact(more, d1, layers=[1])
    assert host_b.read_bandwidths()["redis"] > 0
    host_a.close()
    host_b.close()


def test_a_store_keeps_serving_dram_while_redis_is_down(server):
    store = redis_store(server.url)
    keys = keys_for(3, salt=14)
    store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    server.kill()
    assert store.lookup(keys).tiers == ("memory",) * 3
    more = keys_for(2, salt=15)
    handle = timed("server killed: store save", store.save, more, ROOT, 0, [payload(k) for k in more])
    with pytest.raises(TierWriteError):
        handle.wait()
    assert timed("server killed: store lookup", store.lookup, keys_for(2, salt=16)).hits == 0
    store.close()


# -- Redis Cluster --------------------------------------------------------------------------------
def test_cluster_round_trip_across_nodes(cluster):
    tier = RedisTier(TINY, CHUNK, cfg(cluster.url, cluster=True))
    keys = keys_for(24, salt=20)
    write_chain(tier, keys)
    assert len({tier._cluster.keyslot(tier.redis_key(k)) * 3 // 16384 for k in keys}) == 3  # all masters
    assert tier.lookup(keys) == 24
    metas, d = read_all(tier, keys)
    assert all(mt is not None for mt in metas)
    assert_exact(keys, d)
    d1 = dests(24, 1)
    assert all(mt is not None for mt in tier.read_many(keys, [0], d1))
    assert_exact(keys, d1, layers=[0])
    assert tier.usage().chunks >= 24
    tier.close()
    with pytest.raises(TierUnavailableError, match="set cluster: true"):  # a cluster node taken for a server
        RedisTier(TINY, CHUNK, cfg(cluster.url))


def test_cluster_store_shares_between_two_stores(cluster):
    a, b = redis_store(cluster.url, cluster=True), redis_store(cluster.url, cluster=True)
    keys = keys_for(6, salt=21)
    a.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    d = dests(6)
    res = b.load_sync(keys, d)
    assert res.loaded == 6 and set(res.tiers) == {"redis"}
    assert_exact(keys, d)
    a.close()
    b.close()


def test_cluster_resharding_moved_keys_are_found_after_the_slot_map_reloads(cluster):
    tier = RedisTier(TINY, CHUNK, cfg(cluster.url, cluster=True))
    keys = keys_for(30, salt=24)
    write_chain(tier, keys)
    src, dst = cluster.nodes[0], cluster.nodes[1]
    node_ids = {line.split()[1]: line.split()[0] for line in src.cli("CLUSTER", "NODES").splitlines()}
    src_id, dst_id = node_ids[f"127.0.0.1:{src.port}@{src.port + 10000}"], node_ids[f"127.0.0.1:{dst.port}@{dst.port + 10000}"]
    moved_keys = [k for k in keys if tier._route_of(tier.redis_key(k)).name == f"127.0.0.1:{src.port}"][:3]
    assert moved_keys
    for key in moved_keys:  # migrate each key's slot from src to dst, as a resharding does
        rkey = tier.redis_key(key).decode()
        slot = str(tier._cluster.keyslot(rkey))
        dst.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        assert "OK" in src.cli("MIGRATE", "127.0.0.1", str(dst.port), rkey, "0", "5000")
        for node in cluster.nodes:
            node.cli("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    # the first request after the move gets MOVED (a miss) and reloads the slot map; then they load
    assert wait_for(lambda: all(mt is not None for mt in tier.read_many(moved_keys, [0, 1], dests(len(moved_keys)))))
    assert tier.lookup(keys) == 30
    assert all(tier._route_of(tier.redis_key(k)).name == f"127.0.0.1:{dst.port}" for k in moved_keys)
    assert tier.metrics.get(m.CHECKSUM_FAILURES, tier="redis") == 0  # a MOVED reply is a miss, not corrupt
    tier.close()


def test_cluster_master_paused_costs_one_timeout_and_the_others_keep_serving(cluster):
    tier = RedisTier(TINY, CHUNK, cfg(cluster.url, cluster=True))
    keys = keys_for(30, salt=23)
    write_chain(tier, keys)
    paused = cluster.nodes[2]
    on_paused = [tier._route_of(tier.redis_key(k)).name == f"127.0.0.1:{paused.port}" for k in keys]
    assert any(on_paused) and not all(on_paused)
    paused.pause()
    try:
        # all nodes are sent their share before any reply is read: one timeout per call, not one per node
        metas = timed("cluster master paused (SIGSTOP): read", tier.read_many, keys, [0, 1], dests(30))
        assert [mt is None for mt in metas] == on_paused
        assert timed("cluster master paused (SIGSTOP): lookup", tier.lookup, keys) == on_paused.index(True)
    finally:
        paused.resume()
    assert wait_for(lambda: tier.lookup(keys) == 30)
    tier.close()


def test_cluster_master_killed_other_slots_keep_serving_then_it_rejoins(cluster):
    """Runs last in the module: it kills one master (and restarts it at the end)."""
    tier = RedisTier(TINY, CHUNK, cfg(cluster.url, cluster=True))
    keys = keys_for(30, salt=22)
    write_chain(tier, keys)
    victim = cluster.nodes[1]
    node_of = {k: tier._route_of(tier.redis_key(k)).name for k in keys}
    on_victim = [node_of[k] == f"127.0.0.1:{victim.port}" for k in keys]
    assert any(on_victim) and not all(on_victim)
    victim.kill()
    first_gap = on_victim.index(True)
    assert timed("cluster master killed: lookup", tier.lookup, keys) == first_gap
    metas = timed("cluster master killed: read", tier.read_many, keys, [0, 1], dests(30))
    assert [mt is None for mt in metas] == on_victim  # the other masters' chunks still load
    survivors = [k for k, v in zip(keys, on_victim) if not v]
    d = dests(len(survivors))
    assert all(mt is not None for mt in tier.read_many(survivors, [0, 1], d))
    assert_exact(survivors, d)
    # a master back on its port with its nodes.conf rejoins (empty); its slots take writes again
    victim.start()
    assert wait_for(lambda: "cluster_state:ok" in victim.cli("CLUSTER", "INFO", check=False), 20)
    assert wait_for(lambda: _try_write(tier, keys), 20)
    assert tier.lookup(keys) == 30
    tier.close()


# -- kvtier serve ---------------------------------------------------------------------------------
def test_two_kvtier_serve_processes_share_chunks_through_redis(shared_server):
    """Two host services (their own sockets and shared-memory pools: two hosts) with one Redis
    below: what one host's engine saved, the other's loads."""
    from tests.service.util import ServiceProcess, cleanup, exact, new_dests, save_chain, service_config, short_tmpdir

    folders = [short_tmpdir(), short_tmpdir()]
    redis_cfg = {"url": shared_server.url, "timeout_s": TIMEOUT_S, "connect_timeout_s": TIMEOUT_S,
                 "namespace": "serve-test"}
    services = []
    try:
        for folder in folders:
            cfg = service_config(folder, slots=16)
            cfg["store"]["lower_tiers"] = [{"redis": redis_cfg}]
            services.append(ServiceProcess(cfg, folder).start())
        a, b = services[0].client(), services[1].client()
        root = a.namespace("shared-model").root()
        keys = a.chunk_keys(root, list(range(5 * a.chunk_tokens)))
        save_chain(a, keys, root).wait()
        a.flush()
        assert wait_for(lambda: b.lookup(keys).hits == 5)
        reply = b.lookup(keys, lease=True)
        assert reply.tiers == ("redis",) * 5
        d = new_dests(5)
        res = b.load(keys, d, lease_id=reply.lease_id).wait()
        assert res.loaded == 5 and exact(keys, d)
        b.release(reply.lease_id)
        assert b.lookup(keys).tiers == ("memory",) * 5  # now in host B's DRAM
        a.close()
        b.close()
    finally:
        for svc in services:
            svc.stop()
        for folder in folders:
            cleanup(folder)


def test_cluster_master_with_a_replica_killed_its_slots_come_back_after_failover(cluster, tmp_path):
    """Runs after the other cluster tests (it leaves nodes[2] dead, its replica promoted)."""
    victim = cluster.nodes[2]
    replica = RedisServer(tmp_path, cluster=True).start()
    try:
        ids = {line.split()[1].split("@")[0]: line.split()[0] for line in victim.cli("CLUSTER", "NODES").splitlines()}
        victim_id = ids[f"127.0.0.1:{victim.port}"]
        replica.cli("--cluster", "add-node", f"127.0.0.1:{replica.port}", f"127.0.0.1:{cluster.nodes[0].port}",
                    "--cluster-slave", "--cluster-master-id", victim_id)
        assert wait_for(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), 20)
        tier = RedisTier(TINY, CHUNK, cfg(cluster.url, cluster=True))
        keys = keys_for(30, salt=25)
        write_chain(tier, keys)
        on_victim = [tier._route_of(tier.redis_key(k)).name == f"127.0.0.1:{victim.port}" for k in keys]
        assert any(on_victim)
        assert wait_for(lambda: replica.cli("DBSIZE").strip() == victim.cli("DBSIZE").strip(), 10)
        victim.kill()
        metas = timed("cluster master with replica killed: read", tier.read_many, keys, [0, 1], dests(30))
        assert [mt is None for mt in metas] == on_victim  # its slots miss until the replica takes over
        # the replica is promoted (cluster-node-timeout 2 s); failed requests reload the slot map
        assert wait_for(lambda: tier.lookup(keys) == 30, 30)
        metas, d = read_all(tier, keys)
        assert all(mt is not None for mt in metas)
        assert_exact(keys, d)
        assert all(tier._route_of(tier.redis_key(k)).name == f"127.0.0.1:{replica.port}"
                   for k, v in zip(keys, on_victim) if v)
        tier.close()
    finally:
        replica.stop()


def test_a_full_connection_pool_is_busy_not_a_failed_server(shared_server):
    """More of this process's threads at once than max_connections: redis-py raises
    MaxConnectionsError (a ConnectionError), which counted as a server failure and opened the
    breaker on a healthy server. Now those requests are misses and the breaker stays closed."""
    shared_server.cli("FLUSHALL")
    tier = RedisTier(TINY, CHUNK, cfg(shared_server.url, max_connections=2, breaker_failures=2))
    keys = keys_for(3, salt=7)
    write_chain(tier, keys)
    pool = tier._single.client.connection_pool
    held = [pool.get_connection(), pool.get_connection()]  # two other threads mid-request
    try:
        for _ in range(3):
            assert tier.lookup(keys) == 0  # busy: a miss
    finally:
        for c in held:
            pool.release(c)
    assert not tier.breaker_open()
    assert tier.lookup(keys) == 3
    tier.close()


def test_a_value_of_a_newer_chunk_format_is_a_miss_left_alone(tier):
    """Hosts mid-upgrade share the tier: a value a newer kvtier wrote is no corrupt value to drop."""
    from kvtier.core.codec import FORMAT_VERSION

    keys = keys_for(1, salt=45)
    write_chain(tier, keys)
    rkey = tier.redis_key(keys[0])
    r = tier._single.client
    r.setrange(rkey, 8, (FORMAT_VERSION + 1).to_bytes(2, "little"))
    assert read_all(tier, keys)[0] == [None]
    assert tier.read_many(keys, [1], dests(1, 1)) == [None]
    assert r.exists(rkey) == 1 and tier.metrics.get(m.CHECKSUM_FAILURES, tier="redis") == 0  # deleted before
    assert tier.foreign_chunks == 2


def test_a_short_value_s_conditional_delete_compares_its_length(tier):
    """A value cut short (a torn write) fails a layer-wise read as "short value". If a host saves
    the chunk again, whole, before that reader's delete, the bytes the reader saw are a prefix of
    the valid value, so only the length (GETRANGE stopped at the short value's end) tells them apart."""
    keys = keys_for(1, salt=46)
    write_chain(tier, keys)
    rkey = tier.redis_key(keys[0])
    r = tier._single.client
    good = r.get(rkey)
    offset = tier._kv_offsets(tier._kv_header)[1]
    r.set(rkey, good[:offset + 100])  # torn inside layer 1
    replies = [r.getrange(rkey, 0, tier._kv_header - 1), r.getrange(rkey, offset, offset + LB - 1)]
    with pytest.raises(CorruptChunkError, match="short value") as seen:
        tier._unpack_layers(keys[0], rkey, replies, [1], [memoryview(dests(1, 1)[0][0])])
    r.set(rkey, good)  # saved again, whole
    tier._drop_corrupt(rkey, seen.value)
    assert r.get(rkey) == good  # deleted before: the part it saw is the valid value's prefix
