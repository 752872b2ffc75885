"""SaveBatch in place (slot_offsets / mark_filled, a GPU connector's direct saves) and its incremental
checksums: every write starts its sections' checksums on the verify threads, commit only collects
them. The checksums equal a plain save's, are always taken over the slot after its write, and a
batch with an unwritten section, or whose checksum failed, publishes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.core.codec import checksum
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.store import TieredStore
from kvtier.store import tiered as tiered_mod
from tests.conftest import CHUNK, TINY, payload
from tests.store.test_tiered import ROOT, keys_for, load_all

CB = TINY.chunk_bytes(CHUNK)
LB = TINY.layer_bytes(CHUNK)
LAYERS = TINY.num_layers


def _store(chunks: int = 8) -> TieredStore:
    return TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=chunks * CB)), TINY)


def _begin(store: TieredStore, keys, threads: bool = True):
    batch = store.begin_save(keys, ROOT, 0)
    batch.checksum_threads = threads
    return batch


def _fill_in_place(store: TieredStore, batch, keys, layers) -> None:
    """What a direct save does: copy each layer into the slots, then mark it filled."""
    pool = store.pool_array()
    for layer in layers:
        for key, off in zip(keys, batch.slot_offsets()):
            pool[off + layer * LB:off + (layer + 1) * LB] = payload(key)[layer]
        batch.mark_filled(layer, 1)


def _slot_counts(store: TieredStore) -> dict[str, int]:
    return store.memory.slot_counts()  # type: ignore[union-attr]


def test_filled_in_place_equals_a_plain_save():
    keys = keys_for(list(range(4 * CHUNK)))
    plain, direct = _store(), _store()
    plain.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    batch = _begin(direct, keys)
    offsets = batch.slot_offsets()
    assert len(set(offsets)) == len(keys) and all(off is not None and off % CB == 0 for off in offsets)
    _fill_in_place(direct, batch, keys, reversed(range(LAYERS)))  # any order
    batch.commit().wait()
    for k in keys:
        want = tuple(checksum(section) for section in payload(k))
        assert direct.memory.meta(k).checksums == plain.memory.meta(k).checksums == want
    res, dests = load_all(direct, keys)
    assert res.failed == ()
    for k, d in zip(keys, dests):
        assert all(np.array_equal(got, want) for got, want in zip(d, payload(k)))
    plain.close()
    direct.close()


@pytest.mark.parametrize("threads", [True, False])
@pytest.mark.parametrize("how", ["write_layer", "write_rows"])
def test_copying_writes_checksum_as_they_go(how, threads, monkeypatch):
    keys = keys_for(list(range(3 * CHUNK)))
    store = _store()
    batch = _begin(store, keys, threads)
    for layer in range(LAYERS):
        if how == "write_layer":
            batch.write_layer(layer, [payload(k)[layer] for k in keys])
        else:
            batch.write_rows(layer, 1, np.stack([payload(k)[layer] for k in keys]))
        assert [s[:2] for s in batch._sums] == [(x, 1) for x in range(layer + 1)]  # noqa: SLF001 - queued at the write
    for *_, handle in batch._sums:  # noqa: SLF001
        handle.wait()
    monkeypatch.setattr(tiered_mod, "checksum", None)  # commit must not checksum anything itself
    batch.commit().wait()
    monkeypatch.undo()
    for k in keys:
        assert store.memory.meta(k).checksums == tuple(checksum(s) for s in payload(k))
    store.close()


def test_checksums_in_the_writing_thread_start_no_threads():
    keys = keys_for(list(range(3 * CHUNK)))
    store = _store()
    batch = store.begin_save(keys, ROOT, 0)
    assert batch.checksum_threads is False  # the default: in the writing thread (a CPU forward saving as it goes)
    _fill_in_place(store, batch, keys, range(LAYERS))
    assert all(handle.done() for *_, handle in batch._sums)  # noqa: SLF001 - computed by mark_filled itself
    batch.commit().wait()
    assert store._verify is None  # noqa: SLF001 - no checksum thread was started
    for k in keys:
        assert store.memory.meta(k).checksums == tuple(checksum(s) for s in payload(k))
    store.close()


def test_large_writes_are_checksummed_in_several_jobs(monkeypatch):
    monkeypatch.setattr(tiered_mod, "SAVE_CHECKSUM_JOB_BYTES", 2 * LB)  # two chunks' section per job
    keys = keys_for(list(range(5 * CHUNK)))
    store = _store()
    batch = _begin(store, keys)
    _fill_in_place(store, batch, keys, range(LAYERS))
    assert [len(chunks) for _, _, chunks, _ in batch._sums] == [2, 2, 1] * LAYERS  # noqa: SLF001
    batch.commit().wait()
    assert load_all(store, keys)[0].failed == ()
    store.close()


def test_a_section_written_again_is_checksummed_again():
    keys = keys_for(list(range(2 * CHUNK)))
    store = _store()
    batch = _begin(store, keys)
    pool = store.pool_array()
    off = batch.slot_offsets()[1]
    pool[off:off + LB] = 7  # a first, wrong version of chunk 1's layer 0
    batch.mark_filled(0, 1)
    _fill_in_place(store, batch, keys, range(LAYERS))  # then the right bytes, marked again
    batch.commit().wait()
    assert store.memory.meta(keys[1]).checksums == tuple(checksum(s) for s in payload(keys[1]))
    res, dests = load_all(store, keys)  # verify_reads: a stale checksum would fail the load
    assert res.failed == ()
    assert np.array_equal(dests[1][0], payload(keys[1])[0])
    store.close()


def test_an_unwritten_section_publishes_nothing():
    keys = keys_for(list(range(2 * CHUNK)))
    store = _store()
    batch = _begin(store, keys)
    _fill_in_place(store, batch, keys, range(LAYERS - 1))
    with pytest.raises(ValueError, match=f"{LAYERS - 1} of {LAYERS} layers written"):
        batch.commit()
    assert store.lookup(keys).hits == 0
    assert _slot_counts(store)["reserved"] == 0 and _slot_counts(store)["resident"] == 0
    store.close()


def test_a_failed_checksum_publishes_nothing(monkeypatch):
    def broken(*args):
        raise OSError("checksum thread failed")

    monkeypatch.setattr(tiered_mod, "_slot_sums", broken)
    keys = keys_for(list(range(2 * CHUNK)))
    store = _store()
    batch = _begin(store, keys)
    _fill_in_place(store, batch, keys, range(LAYERS))
    with pytest.raises(OSError, match="checksum thread failed"):
        batch.commit()
    assert store.lookup(keys).hits == 0
    assert _slot_counts(store) == {"slots": 8, "free": 8, "reserved": 0, "resident": 0, "pinned": 0}
    store.close()


def test_in_place_bad_input():
    keys = keys_for(list(range(2 * CHUNK)))
    store = _store()
    batch = _begin(store, keys)
    for first, span in ((-1, 1), (0, 0), (LAYERS - 1, 2), (LAYERS, 1)):
        with pytest.raises(ValueError, match="outside"):
            batch.mark_filled(first, span)
    for first, span in ((0.0, 1), (True, 1), (0, "1")):
        with pytest.raises(ValueError, match="must be an int"):
            batch.mark_filled(first, span)
    batch.abort()
    with pytest.raises(ValueError, match="committed or aborted"):
        batch.slot_offsets()
    with pytest.raises(ValueError, match="committed or aborted"):
        batch.mark_filled(0, 1)
    store.close()


def test_chunks_without_a_slot_cannot_be_filled_in_place():
    keys = keys_for(list(range(3 * CHUNK)))
    store = _store(chunks=2)
    batch = _begin(store, keys)
    offsets = batch.slot_offsets()
    assert offsets[2] is None and None not in offsets[:2]  # DRAM has room for two
    with pytest.raises(ValueError, match=r"chunks \[2\] have no DRAM slot"):
        batch.mark_filled(0, 1)
    batch.abort()
    assert _slot_counts(store)["free"] == 2
    store.close()
