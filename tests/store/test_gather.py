"""TieredStore.gather_here: rows of consecutive sections of many chunks, DRAM hits by one batched copy."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.core.codec import CHECKSUM_AT_RELEASES_GIL
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import TieredStore

LAYOUT = KVLayout(6, 1, 8, "float32", planes=1)  # 6 sections of 4 tokens x 8 x 4 bytes = 128 bytes


def saved_store(n: int, tmp_path=None, memory_chunks: int = 16) -> tuple[TieredStore, list[bytes], np.ndarray]:
    disk = DiskTierConfig(root=str(tmp_path), capacity_bytes=1 << 24) if tmp_path is not None else None
    store = TieredStore(StoreConfig(chunk_tokens=4, memory=MemoryTierConfig(capacity_bytes=memory_chunks * 6 * 128),
                                    disk=disk), LAYOUT)
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=(n, 6, store.layer_bytes), dtype=np.uint8)
    keys = [bytes([i + 1]) * 16 for i in range(n)]
    batch = store.begin_save(keys, b"\0" * 16, 0)
    for s in range(6):
        batch.write_layer(s, [payload[i, s] for i in range(n)])
    batch.commit().wait()
    store.flush()
    return store, keys, payload


def flip(store: TieredStore, key: bytes, section: int, index: int, bits: int) -> None:
    """Corrupt byte `index` of `key`'s section in its DRAM slot (xor `bits`)."""
    assert store.memory is not None
    slot = store.memory.slot_of(key)
    assert slot is not None
    store.memory.layer_view(slot, section)[index] ^= bits


def test_rows_equal_the_sections_read_one_by_one() -> None:
    store, keys, payload = saved_store(5)
    pick = [(3, 0), (0, 4), (3, 2), (1, 0), (4, 4)]  # (chunk, first section); a chunk twice
    out = np.zeros((len(pick), 2 * store.layer_bytes), dtype=np.uint8)
    res = store.gather_here([keys[c] for c, _ in pick], [s for _, s in pick], 2, out)
    assert res.failed == () and res.loaded == len(pick)
    for row, (c, s) in zip(out, pick):
        assert np.array_equal(row, payload[c, s : s + 2].reshape(-1))
    store.close()


def test_a_corrupt_section_in_dram_is_reloaded_from_disk(tmp_path) -> None:
    store, keys, payload = saved_store(3, tmp_path)
    flip(store, keys[1], 3, 0, 0xFF)  # DRAM copy of chunk 1's section 3 corrupted
    out = np.zeros((2, store.layer_bytes), dtype=np.uint8)
    res = store.gather_here([keys[1], keys[2]], [3, 3], 1, out)
    assert res.failed == ()
    assert np.array_equal(out[0], payload[1, 3]) and np.array_equal(out[1], payload[2, 3])
    store.close()


def test_missing_chunks_are_reported_and_the_rest_filled() -> None:
    store, keys, payload = saved_store(2)
    out = np.zeros((3, store.layer_bytes), dtype=np.uint8)
    res = store.gather_here([keys[0], b"\x77" * 16, keys[1]], [5, 5, 0], 1, out)
    assert res.failed == (1,) and res.loaded == 1
    assert np.array_equal(out[0], payload[0, 5]) and np.array_equal(out[2], payload[1, 0])
    assert store.memory is not None and store.memory.slot_counts()["pinned"] == 0  # pins were all released
    store.close()


def test_bad_arguments_are_refused() -> None:
    store, keys, _ = saved_store(1)
    lb = store.layer_bytes
    with pytest.raises(ValueError, match="outside"):
        store.gather_here(keys, [5], 2, np.zeros((1, 2 * lb), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        store.gather_here(keys, [0], 2, np.zeros((1, lb), dtype=np.uint8))
    with pytest.raises(ValueError, match="span"):
        store.gather_here(keys, [0], 0, np.zeros((1, 0), dtype=np.uint8))
    store.close()


def test_write_rows_equals_writing_each_section() -> None:
    n = 3
    rng = np.random.default_rng(1)
    stores = []
    for batched in (False, True):
        store = TieredStore(StoreConfig(chunk_tokens=4, memory=MemoryTierConfig(capacity_bytes=8 * 6 * 128)), LAYOUT)
        payload = rng.integers(0, 256, size=(n, 6, store.layer_bytes), dtype=np.uint8) if not stores else stores[0][1]
        keys = [bytes([i + 9]) * 16 for i in range(n)]
        batch = store.begin_save(keys, b"\0" * 16, 0)
        if batched:
            batch.write_layer(0, [payload[i, 0] for i in range(n)])
            batch.write_rows(1, 3, np.ascontiguousarray(payload[:, 1:4].reshape(n, -1)))
            batch.write_rows(4, 2, np.ascontiguousarray(payload[:, 4:6].reshape(n, -1)))
        else:
            for s in range(6):
                batch.write_layer(s, [payload[i, s] for i in range(n)])
        batch.commit().wait()
        stores.append((store, payload, keys))
    for store, payload, keys in stores:
        out = np.zeros((n, 6 * store.layer_bytes), dtype=np.uint8)
        assert store.gather_here(keys, [0] * n, 6, out).failed == ()  # verified against the commit's checksums
        assert np.array_equal(out, payload.reshape(n, -1))
        with pytest.raises(ValueError, match="outside"):
            store.begin_save([b"\x55" * 16], b"\0" * 16, 0).write_rows(5, 2, np.zeros((1, 2 * 128), np.uint8))
        store.close()


def test_a_large_gather_verifies_on_several_threads_and_still_catches_corruption(monkeypatch) -> None:
    from kvtier.store import tiered

    monkeypatch.setattr(tiered, "_VERIFY_PARALLEL_BYTES", 1)  # every gather verifies on threads
    monkeypatch.setattr(tiered, "_VERIFY_THREADS", 4)  # as on a machine with cores to spare
    store, keys, payload = saved_store(8)
    flip(store, keys[6], 2, 5, 0x01)
    out = np.zeros((8, store.layer_bytes), dtype=np.uint8)
    res = store.gather_here(keys, [2] * 8, 1, out)
    assert res.failed == (6,)  # no disk to reload it from: reported, never served
    for i in range(8):
        if i != 6:
            assert np.array_equal(out[i], payload[i, 2])
    assert store._verify is not None  # noqa: SLF001 - the checks ran on the store's checksum threads
    store.close()


def test_without_a_gil_free_checksum_a_large_gather_verifies_here_and_still_catches_corruption(monkeypatch) -> None:
    from kvtier.store import tiered

    monkeypatch.setattr(tiered, "_VERIFY_PARALLEL_BYTES", 1)
    monkeypatch.setattr(tiered, "CHECKSUM_AT_RELEASES_GIL", False)  # threads would only take turns
    store, keys, payload = saved_store(8)
    flip(store, keys[3], 1, 0, 0x80)
    out = np.zeros((8, 2 * store.layer_bytes), dtype=np.uint8)
    res = store.gather_here(keys, [0] * 8, 2, out)
    assert res.failed == (3,)
    for i in range(8):
        if i != 3:
            assert np.array_equal(out[i], payload[i, 0:2].reshape(-1))
    assert store._verify is None  # noqa: SLF001 - checked in the calling thread
    store.close()


def test_threaded_verification_finds_a_corrupt_section_anywhere_in_a_row(monkeypatch) -> None:
    from kvtier.store import tiered

    monkeypatch.setattr(tiered, "_VERIFY_PARALLEL_BYTES", 1)
    monkeypatch.setattr(tiered, "_VERIFY_THREADS", 3)  # rows 2 and 5 checked by different threads
    store, keys, payload = saved_store(8)
    for key, section in ((keys[2], 3), (keys[5], 4)):  # first and second section of rows 2 and 5
        flip(store, key, section, -1, 0x01)
    out = np.zeros((8, 2 * store.layer_bytes), dtype=np.uint8)
    res = store.gather_here(keys, [3] * 8, 2, out)
    assert res.failed == (2, 5)
    for i in (0, 1, 3, 4, 6, 7):
        assert np.array_equal(out[i], payload[i, 3:5].reshape(-1))
    store.close()


@pytest.mark.skipif(not CHECKSUM_AT_RELEASES_GIL, reason="this xxhash build exports no XXH3_64bits to call without the GIL")
def test_a_gather_on_a_background_thread_verifies_without_the_gil_and_catches_corruption(monkeypatch) -> None:
    import threading

    from kvtier.store import tiered

    used: list[int] = []
    real = tiered._failed_rows_at
    monkeypatch.setattr(tiered, "_failed_rows_at", lambda *a: (used.append(len(a[-1])), real(*a))[1])
    store, keys, payload = saved_store(4)
    flip(store, keys[1], 2, 7, 0x10)
    out = np.zeros((4, 2 * store.layer_bytes), dtype=np.uint8)
    got: list[tuple[int, ...]] = []
    worker = threading.Thread(target=lambda: got.append(store.gather_here(keys, [1] * 4, 2, out).failed))
    worker.start()
    worker.join()
    assert got == [(1,)] and used == [4]  # a small gather, hashed in the worker's own thread
    for i in (0, 2, 3):
        assert np.array_equal(out[i], payload[i, 1:3].reshape(-1))
    store.close()


def test_a_machine_without_a_core_to_spare_verifies_a_large_gather_here(monkeypatch) -> None:
    from kvtier.store import tiered

    monkeypatch.setattr(tiered, "_VERIFY_PARALLEL_BYTES", 1)
    monkeypatch.setattr(tiered, "_VERIFY_THREADS", 1)
    store, keys, payload = saved_store(4)
    out = np.zeros((4, store.layer_bytes), dtype=np.uint8)
    assert store.gather_here(keys, [2] * 4, 1, out).failed == ()
    assert np.array_equal(out, payload[:, 2])
    assert store._verify is None  # noqa: SLF001 - no checksum threads were started
    store.close()
