"""StoreConfig.lower_tiers: further tiers below DRAM and the first disk tier.

A second folder (a DiskTier opened through lower_tiers) stands in for the shared tiers here;
tests/tiers/test_redis.py runs the same paths against real Redis servers.
"""

import numpy as np
import pytest

from kvtier.core import metrics as m
from kvtier.core.config import (
    DiskTierConfig,
    LowerTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    StoreConfig,
    load_config,
)
from kvtier.core.errors import ConfigError
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY, payload

ROOT = Namespace("test-model", TINY.layout_id(CHUNK)).root()
LB = TINY.layer_bytes(CHUNK)


def folder(path, name="shared", **kw) -> LowerTierConfig:
    return LowerTierConfig(name=name, disk=DiskTierConfig(root=str(path), capacity_bytes=1 << 30, **kw))


def make_store(tmp_path, lower, mem_chunks=16, disk=False) -> TieredStore:
    cfg = StoreConfig(
        chunk_tokens=CHUNK,
        memory=MemoryTierConfig(capacity_bytes=mem_chunks * TINY.chunk_bytes(CHUNK)) if mem_chunks else None,
        disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 30) if disk else None,
        lower_tiers=tuple(lower),
    )
    return TieredStore(cfg, TINY)


def keys_for(n_chunks: int, salt: int = 0) -> list[bytes]:
    return chunk_keys(ROOT, [salt * 1000 + t for t in range(n_chunks * CHUNK)], CHUNK)


def save_chain(store, keys):
    return store.save(keys, ROOT, 0, [payload(k) for k in keys])


def load(store, keys):
    dests = [[np.zeros(LB, np.uint8) for _ in range(TINY.num_layers)] for _ in keys]
    return store.load_sync(keys, dests), dests


def assert_exact(keys, dests):
    for k, d in zip(keys, dests):
        for got, want in zip(d, payload(k)):
            assert np.array_equal(got, want)


def test_save_writes_every_lower_tier_and_another_store_loads_it(tmp_path):
    a = make_store(tmp_path, [folder(tmp_path / "l1", "l1"), folder(tmp_path / "l2", "l2")], disk=True)
    keys = keys_for(4)
    save_chain(a, keys).wait()
    a.flush()
    assert [t.usage().chunks for t in a.lower_tiers] == [4, 4]
    a.close()
    # a second store (its own empty DRAM, no disk) that reads the l2 folder only: a second host
    b = make_store(tmp_path, [folder(tmp_path / "l2", "l2")])
    assert b.lookup(keys).tiers == ("l2",) * 4
    res, dests = load(b, keys)
    assert res.loaded == 4 and res.tiers == ("l2",) * 4
    assert_exact(keys, dests)
    # promoted to DRAM on the hit
    assert b.lookup(keys).tiers == ("memory",) * 4
    bw = b.read_bandwidths()
    assert bw["l2"] is not None and bw["l2"] > 0
    assert b.stats()["l2"]["read_gbps"] == bw["l2"] and b.stats()["l2"]["chunks"] == 4
    b.close()


def test_lookup_stops_at_the_first_gap_and_mixes_tiers(tmp_path):
    lower = [folder(tmp_path / "l1")]
    a = make_store(tmp_path, lower, mem_chunks=0, disk=True)
    keys = keys_for(5)
    save_chain(a, keys).wait()
    a.flush()
    shared = a.lower_tiers[0]
    assert shared.delete(keys[3])
    a.disk.delete(keys[3])
    a.disk.delete(keys[1])  # chunk 1 only in the lower tier: disk, shared, disk, gap
    assert a.lookup(keys).tiers == ("disk", "shared", "disk")
    res, dests = load(a, keys[:3])
    assert res.loaded == 3 and res.tiers == ("disk", "shared", "disk")
    assert_exact(keys[:3], dests)
    # a lower tier whose run ended at a key is not asked about that key again (one round trip)
    asked = []
    real_lookup = shared.lookup
    shared.lookup = lambda ks: asked.append(len(ks)) or real_lookup(ks)
    a.disk.delete(keys[2])
    assert a.lookup(keys).tiers == ("disk", "shared", "shared")
    assert asked == [4]
    a.close()


def test_lower_write_follows_the_chain_and_survives_dram_eviction(tmp_path):
    # DRAM for two chunks, a save of six: each chunk stays pinned until the lower writer has it
    store = make_store(tmp_path, [folder(tmp_path / "l1")], mem_chunks=2)
    keys = keys_for(6)
    save_chain(store, keys).wait()
    store.flush()
    assert store.lower_tiers[0].lookup(keys) == 6
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_a_failing_lower_tier_stops_its_chain_and_reaches_the_handle(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1")])
    shared = store.lower_tiers[0]
    keys = keys_for(3)
    real_write = shared.write
    calls = []

    def fail_second(meta, layers):
        calls.append(meta.key)
        if len(calls) == 2:
            from kvtier.tiers.base import TierWriteError

            raise TierWriteError("injected")
        return real_write(meta, layers)

    shared.write = fail_second
    handle = save_chain(store, keys)
    with pytest.raises(Exception, match="injected"):
        handle.wait()
    assert calls == keys[:2]  # the child of the failed chunk is never written
    assert shared.lookup(keys) == 1
    assert store.lookup(keys).hits == 3  # DRAM still has all three
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_config_from_a_mapping_names_the_bad_key(tmp_path):
    cfg = load_config(StoreConfig, {"lower_tiers": [{"redis": {"url": "redis://127.0.0.1:6390/0"}},
                                                    {"name": "nfs", "disk": {"root": str(tmp_path)}}]})
    assert [t.kind for t in cfg.lower_tiers] == ["redis", "disk"]
    assert [t.tier_name for t in cfg.lower_tiers] == ["redis", "nfs"]
    assert isinstance(cfg.lower_tiers[0].settings, RedisTierConfig)
    with pytest.raises(ConfigError, match=r"lower_tiers\[1\]\.redis: url 'http://x' does not parse"):
        load_config(StoreConfig, {"lower_tiers": [{"name": "a", "disk": {"root": "/tmp/x"}},
                                                  {"redis": {"url": "http://x"}}]})
    with pytest.raises(ConfigError, match=r"lower_tiers\[0\]\.redis\.timeout_s"):
        load_config(StoreConfig, {"lower_tiers": [{"redis": {"url": "redis://h:1", "timeout_s": "soon"}}]})
    with pytest.raises(ConfigError, match=r"lower_tiers\[0\].*exactly one of"):
        load_config(StoreConfig, {"lower_tiers": [{"name": "x"}]})
    with pytest.raises(ConfigError, match=r"lower_tiers\[1\]\.name: 'redis' is already"):
        load_config(StoreConfig, {"lower_tiers": [{"redis": {"url": "redis://h:1"}},
                                                  {"redis": {"url": "redis://h:2"}}]})
    with pytest.raises(ConfigError, match=r"lower_tiers\[0\]\.name: 'disk' is already"):
        load_config(StoreConfig, {"disk": {"root": "/tmp/a"}, "lower_tiers": [{"disk": {"root": "/tmp/b"}}]})
    with pytest.raises(ConfigError, match=r"lower_tiers\[0\]\.redis: url 'redis://h:99999' does not parse"):
        load_config(StoreConfig, {"lower_tiers": [{"redis": {"url": "redis://h:99999"}}]})


def test_store_host_leases_and_pins_chunks_of_a_lower_tier(tmp_path):
    """The host service's path (and the in-process client's): lookup, lease and load_begin see the
    lower tiers, and a lower hit is promoted into a pinned DRAM slot."""
    from kvtier.service.host import NO_SLOT, StoreHost

    writer = make_store(tmp_path, [folder(tmp_path / "l1")])
    keys = keys_for(3, salt=7)
    save_chain(writer, keys).wait()
    writer.close()
    store = make_store(tmp_path, [folder(tmp_path / "l1")], mem_chunks=4)
    host = StoreHost(store)
    asked = []
    shared = store.lower_tiers[0]
    real_lookup = shared.lookup
    shared.lookup = lambda ks: asked.append(len(ks)) or real_lookup(ks)
    hits, tiers, lease = host.lookup(1, keys + keys_for(1, salt=8), lease=True)
    assert hits == 3 and tiers == ["shared"] * 3 and lease is not None
    assert asked == [4]  # one batched lookup; not asked again about the key its run ended at
    assert host.wait_lease(lease)
    assert store.memory.lookup(keys) == 3  # promoted by the lease
    host.release(lease)
    store.memory.delete(keys[2])
    pins = host.load_begin(1, keys)
    assert NO_SLOT not in pins.slots and pins.tiers == ["memory", "memory", "shared"]
    for key, slot in zip(keys, pins.slots):
        for layer, want in enumerate(payload(key)):
            assert np.array_equal(store.memory.layer_view(slot, layer), want)
    host.load_end(1, pins.load_id)
    assert store.memory.slot_counts()["pinned"] == 0
    host.close()
    store.close()


def test_in_process_client_finds_chunks_of_a_lower_tier(tmp_path):
    from kvtier.client import connect

    writer = make_store(tmp_path, [folder(tmp_path / "l1")])
    keys = keys_for(2, salt=9)
    save_chain(writer, keys).wait()
    writer.close()
    client = connect({"store": {"chunk_tokens": CHUNK, "lower_tiers": [
        {"name": "shared", "disk": {"root": str(tmp_path / "l1")}}]}}, layout=TINY)
    reply = client.lookup(keys)
    assert reply.hits == 2 and reply.tiers == ("shared", "shared")
    dests = [[np.zeros(LB, np.uint8) for _ in range(TINY.num_layers)] for _ in keys]
    assert client.load(keys, dests).wait().loaded == 2
    assert_exact(keys, dests)
    client.close()


class GatedWrites:
    """A lower tier's write that blocks, for the keys in `gated`, until `open` is set."""

    def __init__(self, tier, gated) -> None:
        import threading

        self.open = threading.Event()
        self.gated = set(gated)
        self._write = tier.write
        tier.write = self

    def __call__(self, meta, layers):
        if meta.key in self.gated:
            assert self.open.wait(30), "the test never opened the gate"
        return self._write(meta, layers)


def test_wait_lower_waits_for_the_named_chunks_lower_writes_only(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1")])
    shared = store.lower_tiers[0]
    a, b = keys_for(2, salt=1), keys_for(2, salt=2)
    gate = GatedWrites(shared, b)
    save_chain(store, a)
    b_written = save_chain(store, b)  # in DRAM at once (the handle is its lower write's), held at the gate
    assert store.lookup(b).hits == 2 and not b_written.done()
    assert store.wait_lower(a, 10.0) == 0  # a's write, queued first, ended
    assert shared.lookup(a) == 2
    assert store.wait_lower(b, 0.0) == 2 and store.wait_lower(a + b, 0.01) == 2  # b's still running
    assert store.wait_lower(keys_for(1, salt=3), 0.0) == 0  # never saved: nothing to wait for
    gate.open.set()
    assert store.wait_lower(b, 10.0) == 0
    assert b_written.done() and shared.lookup(b) == 2  # written once the wait ended
    store.close()


def test_wait_lower_counts_a_failed_write_as_ended(tmp_path):
    from kvtier.tiers.base import TierWriteError

    store = make_store(tmp_path, [folder(tmp_path / "l1")])
    shared = store.lower_tiers[0]

    def fail(meta, layers):
        raise TierWriteError("injected")

    shared.write = fail
    keys = keys_for(2)
    handle = save_chain(store, keys)
    assert store.wait_lower(keys, 10.0) == 0
    with pytest.raises(TierWriteError, match="injected"):
        handle.wait()
    assert shared.lookup(keys) == 0 and store.lookup(keys).hits == 2  # a miss there, DRAM still has them
    assert not store._lower_pending  # nothing left to wait for
    store.close()


def test_wait_lower_without_lower_tiers_and_bad_input(tmp_path):
    store = make_store(tmp_path, [])
    keys = keys_for(2)
    save_chain(store, keys).wait()
    assert store.wait_lower(keys, 1.0) == 0
    with pytest.raises(ValueError, match="timeout_s"):
        store.wait_lower(keys, -1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        store.wait_lower(keys, float("nan"))
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        store.wait_lower([keys[0], b"short"], 1.0)
    store.close()


def _nfs_then_disk(tmp_path):
    from kvtier.core.config import SharedFolderTierConfig

    return [LowerTierConfig(name="nfs", shared_folder=SharedFolderTierConfig(root=str(tmp_path / "nfs"), owner=False)),
            folder(tmp_path / "l2", name="l2")]


def _eio_under(monkeypatch, root) -> None:
    """Every stat/open/utime under `root` fails with EIO: an NFS soft mount whose server is away."""
    import errno
    import os

    root = str(root)
    for name in ("stat", "open", "utime"):
        real = getattr(os, name)

        def failing(path, *a, _real=real, **kw):
            if isinstance(path, str) and path.startswith(root):
                raise OSError(errno.EIO, "Input/output error", path)
            return _real(path, *a, **kw)

        monkeypatch.setattr(os, name, failing)


def test_a_failing_shared_mount_is_a_miss_in_its_tier_and_the_tiers_below_serve(tmp_path, monkeypatch):
    """Bug: the shared folder re-raised every I/O error but a vanished file's, so a failing mount
    failed the engine's lookups and loads, and a chain's write stopped in every tier below it."""
    keys = keys_for(4)
    a = make_store(tmp_path, _nfs_then_disk(tmp_path))
    save_chain(a, keys[:3]).wait()
    a.flush()
    a.close()
    b = make_store(tmp_path, _nfs_then_disk(tmp_path))
    _eio_under(monkeypatch, tmp_path / "nfs")
    look = b.lookup(keys[:3])
    assert look.hits == 3 and look.tiers == ("l2",) * 3
    res, dests = load(b, keys[:3])
    assert res.loaded == 3 and res.tiers == ("l2",) * 3
    assert_exact(keys[:3], dests)
    with pytest.raises(Exception, match="nfs"):  # the failing tier's chain stops, and says so
        b.save(keys[3:], keys[2], 3, [payload(keys[3])]).wait()
    b.flush()
    assert b.lower_tiers[1].contains(keys[3])  # the tier below still got it
    assert b.metrics.get(m.READ_ERRORS, tier="nfs") > 0
    b.close()


def test_a_chunk_found_corrupt_in_dram_before_its_lower_write_is_reported_as_corrupt(tmp_path):
    """A chunk pinned for its lower-tier write that a borrower finds corrupt is never written, and
    the save's error says so (it said "evicted from DRAM", which sent a reader after capacity)."""
    import threading

    store = make_store(tmp_path, [folder(tmp_path / "shared")])
    gate = threading.Event()
    store._lower_writer.submit("block", gate.wait)  # noqa: SLF001 - the lower writer is busy
    keys = keys_for(2, salt=77)
    h = save_chain(store, keys)
    entries = store.borrow_memory(keys[:1])
    store.pool_array()[entries[0].slot * store.memory.chunk_bytes] ^= 0xFF
    assert store.verify_borrowed(entries, [0]).wait().failed == (0,)
    store.release_borrowed(entries)
    gate.set()
    with pytest.raises(Exception, match="chunk 0 was found corrupt in DRAM before its write"):
        h.wait(10)
    shared = store.lower_tiers[0]
    assert not shared.contains(keys[0]) and not shared.contains(keys[1])
    store.close()
