"""A chunk's bytes and its checksums always travel together, and a pin is a reference on one
resident entry (never a key): the bugs an audit found where they did not.

- a chunk saved again while resident: the disk write paired the resident bytes with the new
  save's checksums, so the disk copy never verified;
- a chunk condemned (a borrower found its slot corrupt) while pinned for its disk write: the
  unpin by key failed, leaking its slot and every later pin of the save;
- a chunk being demoted (write-back) was served from the demotion queue unchecked;
- publishing and pinning were two steps: an eviction in between lost a write-through chunk;
- a load naming a layer twice failed on its disk promotion."""

from __future__ import annotations

import threading

import numpy as np

from kvtier.core import metrics as m
from tests.conftest import key_of
from tests.store.test_tiered import LB, ROOT, TINY, keys_for, load_all, make_store, payload


def test_a_resident_chunk_saved_again_goes_to_disk_with_its_own_checksums(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(list(range(4)))  # one chunk
    p1 = payload(keys[0])
    store.save(keys, ROOT, 0, [p1]).wait()
    assert store.disk.delete(keys[0])  # the disk tier let it go; DRAM still holds it
    p2 = [x.copy() for x in p1]  # computed again: KV that differs in its low bits
    p2[0][0] ^= 1
    assert store.save(keys, ROOT, 0, [p2]).wait().on_disk == 1
    assert store.memory.delete(keys[0])
    res, dests = load_all(store, keys)
    assert res.loaded == 1 and res.tiers == ("disk",)  # the disk copy verifies: the resident bytes, their sums
    assert all(np.array_equal(d, p) for d, p in zip(dests[0], p1, strict=True))
    store.close()


def test_a_chunk_condemned_while_pinned_for_its_disk_write_frees_its_slot(tmp_path):
    store = make_store(tmp_path, mem_chunks=4)
    mem = store.memory
    gate = threading.Event()
    store._writer.submit("block", gate.wait)  # noqa: SLF001 - the disk writer is busy (a slow disk)
    keys = keys_for(list(range(8)))  # two chunks, both pinned for their disk writes
    h = store.save(keys, ROOT, 0, [payload(k) for k in keys])
    entries = store.borrow_memory(keys[:1])  # a GPU connector reads chunk 0 in place: corrupt
    store.pool_array()[entries[0].slot * mem.chunk_bytes] ^= 0xFF
    assert store.verify_borrowed(entries, [0]).wait().failed == (0,)
    store.release_borrowed(entries)
    gate.set()
    result = h.wait(10)
    store.flush()
    assert result.on_disk == 0 and "failed its checksum in DRAM" in result.errors[0]
    assert not store.disk.contains(keys[0]) and not store.disk.contains(keys[1])  # a child never without its parent
    counts = mem.slot_counts()
    assert counts["free"] + counts["reserved"] + counts["resident"] == counts["slots"]
    assert counts["pinned"] == 0 and store._write_pins == 0  # noqa: SLF001
    store.close()


def test_a_chunk_corrupted_in_dram_is_not_served_or_written_as_it_is_demoted(tmp_path):
    store = make_store(tmp_path, mem_chunks=1, write_mode="write-back")
    mem = store.memory
    keys = keys_for(list(range(8)))
    a, b = keys[:1], keys[1:]
    store.save(a, ROOT, 0, [payload(k) for k in a]).wait()
    entry = mem.pin_entry(a[0])
    assert entry is not None
    mem.release([entry])
    mem.pool_array()[entry.slot * mem.chunk_bytes + 5] ^= 0xFF  # a bit flips in DRAM
    gate = threading.Event()
    store._writer.submit("block", gate.wait)  # noqa: SLF001 - the demotion waits in its queue
    store.save(b, a[0], 1, [payload(k) for k in b]).wait()  # evicts A: demoted
    res, _ = load_all(store, a)
    gate.set()
    store.flush()
    assert res.loaded == 0  # before: served from the demotion queue as a good disk hit
    assert not store.disk.contains(a[0])
    assert store.metrics.get(m.CHECKSUM_FAILURES, tier=mem.name) == 1
    store.close()


def test_a_chunk_is_pinned_as_it_is_published_so_no_eviction_loses_it(tmp_path):
    store = make_store(tmp_path, mem_chunks=1)  # write-through
    mem = store.memory
    real = mem.commit_pinned
    other = []

    def commit_then_another_save(res, meta):
        out = real(res, meta)
        t = threading.Thread(target=lambda: other.append(mem.allocate(key_of(123))))  # wants the only slot
        t.start()
        t.join()
        return out

    mem.commit_pinned = commit_then_another_save
    keys = keys_for(list(range(4)))
    result = store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    assert other == [None]  # the chunk was pinned: nothing to evict
    assert result.in_memory == 1 and result.on_disk == 1 and not result.errors
    store.close()


def test_a_load_naming_a_layer_twice_is_served_from_disk(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(list(range(4)))
    store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    assert store.memory.delete(keys[0])  # on disk only
    dests = [[np.zeros(LB, np.uint8) for _ in range(TINY.num_layers)]]
    assert store.load(keys, dests, layers=[0, 0]).wait().loaded == 1  # before: "1 is not in list"
    assert all(np.array_equal(d, payload(keys[0])[0]) for d in dests[0])
    assert not store.memory.contains(keys[0])  # not a whole chunk: nothing promoted
    store.close()
