import numpy as np
import pytest

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.errors import StoreClosedError
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.store import TieredStore
from kvtier.tiers.base import TierWriteError
from tests.conftest import CHUNK, TINY, payload

ROOT = Namespace("test-model", TINY.layout_id(CHUNK)).root()
LB = TINY.layer_bytes(CHUNK)


def make_store(tmp_path=None, mem_chunks=16, disk=True, **kw) -> TieredStore:
    cfg = StoreConfig(
        chunk_tokens=CHUNK,
        memory=MemoryTierConfig(capacity_bytes=mem_chunks * TINY.chunk_bytes(CHUNK)) if mem_chunks else None,
        disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 30) if disk else None,
        **kw,
    )
    return TieredStore(cfg, TINY)


def keys_for(tokens):
    return chunk_keys(ROOT, tokens, CHUNK)


def save_chain(store, keys, start=0):
    parent = ROOT if start == 0 else keys[start - 1]
    return store.save(keys[start:], parent, start, [payload(k) for k in keys[start:]])


def load_all(store, keys):
    dests = [[np.zeros(LB, np.uint8) for _ in range(TINY.num_layers)] for _ in keys]
    res = store.load(keys, dests).wait()
    return res, dests


def assert_exact(keys, dests, n=None):
    for k, d in list(zip(keys, dests))[:n]:
        for got, want in zip(d, payload(k)):
            assert np.array_equal(got, want)


def test_memory_only_roundtrip_and_lookup():
    store = make_store(disk=False)
    keys = keys_for(list(range(20)))  # 5 chunks
    save_chain(store, keys[:3]).wait()
    assert store.lookup(keys).hits == 3
    res, dests = load_all(store, keys[:3])
    assert res.loaded == 3 and res.failed == () and res.tiers == ("memory",) * 3
    assert_exact(keys, dests, 3)
    store.close()
    with pytest.raises(StoreClosedError):
        store.lookup(keys)


def test_load_reports_exact_failures():
    store = make_store(disk=False)
    keys = keys_for(list(range(16)))
    save_chain(store, keys).wait()
    store.memory.delete(keys[1])
    res, dests = load_all(store, keys)
    assert res.loaded == 1 and res.failed == (1,)
    assert res.tiers == ("memory", "", "memory", "memory")
    store.close()


def test_load_here_loads_in_the_calling_thread_like_load(tmp_path):
    import threading

    store = make_store(tmp_path, mem_chunks=2)  # 4 chunks: two end up on disk only
    keys = keys_for(list(range(16)))
    save_chain(store, keys).wait()
    store.flush()
    store.memory.delete(keys[3])
    store.disk.delete(keys[3])
    seen = []
    real = store._load_now
    store._load_now = lambda *a: (seen.append(threading.current_thread()), real(*a))[1]
    dests = [[np.zeros(LB, np.uint8)] for _ in keys]
    res = store.load_here(keys, dests, [1])
    assert seen == [threading.current_thread()]
    assert res.loaded == 3 and res.failed == (3,) and res.tiers[3] == ""
    for k, d in list(zip(keys, dests))[:3]:
        assert np.array_equal(d[0], payload(k)[1])
    with pytest.raises(ValueError, match="destination buffers"):
        store.load_here(keys, [[np.zeros(LB, np.uint8)] for _ in keys], [0, 1])
    store.close()
    with pytest.raises(StoreClosedError):
        store.load_here(keys, dests, [1])


def test_save_layer_by_layer_invisible_until_commit():
    store = make_store(disk=False)
    keys = keys_for(list(range(8)))
    batch = store.begin_save(keys, ROOT, 0)
    batch.write_layer(0, [payload(k)[0] for k in keys])
    assert store.lookup(keys).hits == 0
    with pytest.raises(ValueError, match="layers written"):
        batch.commit()
    # a failed commit releases the slots; a fresh save works
    save_chain(store, keys).wait()
    assert store.lookup(keys).hits == 2
    store.close()


def test_write_through_to_disk_and_promotion(tmp_path):
    store = make_store(tmp_path, mem_chunks=4)
    keys = keys_for(list(range(32)))  # 8 chunks, DRAM holds 4
    r = save_chain(store, keys).wait()
    assert r.on_disk == 8
    look = store.lookup(keys)
    assert look.hits == 8 and "disk" in look.tiers and "memory" in look.tiers
    res, dests = load_all(store, keys)
    assert res.loaded == 8
    assert_exact(keys, dests)
    # the head of the chain came from disk and was promoted back to DRAM
    assert store.memory.contains(keys[-1]) or store.memory.contains(keys[0])
    store.close()


def test_reopen_serves_committed(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(list(range(24)))
    save_chain(store, keys).wait()
    store.close()
    store = make_store(tmp_path)
    assert store.lookup(keys).tiers == ("disk",) * 6
    res, dests = load_all(store, keys)
    assert res.loaded == 6
    assert_exact(keys, dests)
    store.close()


def test_disk_full_is_reported_in_save_errors_and_store_stays_usable(tmp_path, monkeypatch):
    import errno
    import os

    store = make_store(tmp_path)
    keys = keys_for(list(range(16)))
    save_chain(store, keys[:2]).wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "writev", full)
    result = save_chain(store, keys, start=2).wait()  # a refusal: reported, not raised
    monkeypatch.undo()
    assert result.on_disk == 0 and len(result.errors) == 1 and "ENOSPC" in result.errors[0]
    # the committed chunks are intact on disk (the chain's head is never evicted to make
    # room for its tail), and DRAM still serves the new ones
    assert store.disk.lookup(keys) == 2
    assert store.lookup(keys).hits == 4
    res, dests = load_all(store, keys)
    assert res.loaded == 4
    assert_exact(keys, dests)
    assert store.metrics.get("kvtier_tier_write_failures_total", tier="disk") == 1
    store.close()


def test_disk_write_failure_fails_the_handle_and_is_counted_once(tmp_path, monkeypatch):
    import errno
    import os

    store = make_store(tmp_path)
    keys = keys_for(list(range(8)))

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "writev", eio)
    with pytest.raises(TierWriteError, match="EIO"):
        save_chain(store, keys).wait()
    monkeypatch.undo()
    assert store.lookup(keys).hits == 2  # still in DRAM
    store.close()  # joins the writer thread, so the handle's callbacks have run
    assert store.metrics.get("kvtier_tier_write_failures_total", tier="disk") == 1  # one chunk failed, once


def test_write_back_demotes_on_eviction(tmp_path):
    store = make_store(tmp_path, mem_chunks=2, write_mode="write-back")
    keys = keys_for(list(range(16)))
    save_chain(store, keys[:2]).wait()
    assert store.disk.lookup(keys) == 0  # write-back: nothing on disk yet
    save_chain(store, keys, start=2).wait()  # evicts the first two from DRAM
    store.flush()
    assert store.disk.lookup(keys[:2]) == 2  # ... which were demoted to disk
    assert store.lookup(keys).hits == 4
    res, dests = load_all(store, keys)
    assert res.loaded == 4
    assert_exact(keys, dests)
    store.close()


def test_write_back_chunks_without_dram_room_go_to_disk(tmp_path):
    store = make_store(tmp_path, mem_chunks=2, write_mode="write-back")
    keys = keys_for(list(range(16)))
    r = save_chain(store, keys).wait()  # one batch of 4: DRAM takes 2, the rest go straight to disk
    assert r.in_memory == 2 and r.on_disk == 2
    assert store.lookup(keys).hits == 4
    res, dests = load_all(store, keys)
    assert res.loaded == 4
    assert_exact(keys, dests)
    store.close()


def test_different_namespace_never_hits():
    store = make_store(disk=False)
    toks = list(range(16))
    save_chain(store, keys_for(toks)).wait()
    other = Namespace("other-model", TINY.layout_id(CHUNK)).root()
    assert store.lookup(chunk_keys(other, toks, CHUNK)).hits == 0
    salted = Namespace("test-model", TINY.layout_id(CHUNK), tenant_salt="t2").root()
    assert store.lookup(chunk_keys(salted, toks, CHUNK)).hits == 0
    store.close()


def test_bad_arguments():
    store = make_store(disk=False)
    keys = keys_for(list(range(8)))
    with pytest.raises(ValueError, match="destination"):
        store.load(keys, [[np.zeros(LB, np.uint8)]])
    with pytest.raises(ValueError, match="source lists"):
        store.save(keys, ROOT, 0, [])
    store.close()


def test_disk_writer_unpins_each_chunk_once_written_and_allocate_memory_waits(tmp_path):
    """Bug: chunks queued for their disk write stayed pinned in DRAM until the whole save was
    written, and a DRAM allocation meanwhile simply failed: with DRAM smaller than a burst
    of saves, the service dropped most of the next document (see tests/service/test_host.py).
    Now each chunk is unpinned as its write lands, and allocate_memory waits for that."""
    import threading

    store = make_store(tmp_path, mem_chunks=2)
    ks = keys_for(list(range(2 * CHUNK)))
    gate = threading.Event()
    first_written = threading.Event()
    real = store.disk.write

    def gated(meta, layers):
        if meta.key == ks[1]:
            first_written.set()
            assert gate.wait(10)
        return real(meta, layers)

    store.disk.write = gated
    handle = save_chain(store, ks)
    assert first_written.wait(10)
    assert store.memory.slot_counts()["pinned"] == 1  # chunk 0 written and unpinned, chunk 1 pending
    other = keys_for(list(range(1000, 1000 + 3 * CHUNK)))
    assert store.allocate_memory(other[0], wait_s=0) is not None  # evicts chunk 0 (on disk now)
    assert store.allocate_memory(other[1], wait_s=0) is None  # only the pending chunk 1 is left
    threading.Timer(0.2, gate.set).start()
    assert store.allocate_memory(other[2], wait_s=10) is not None  # waited for chunk 1's write
    assert handle.wait().on_disk == 2
    assert store.disk.lookup(ks) == 2
    store.close()
