"""Sparse saves the store did not carry out, on real stores with a fault injected:

- flush() did not look at SaveResult.errors: blocks a full disk refused were found only at
  decode, as BlockMissingError (or never, while DRAM still held them);
- a block DRAM had no slot for, in a store with nothing below DRAM, was dropped without a word;
- flush() stopped at the first failed save and forgot the rest: a second flush, or close,
  returned as if every block were stored;
- with synchronous writes a failed save raised at append only: flush and close passed after;
- close() after a forward that failed part-way kept the open span's DRAM slots reserved for good.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.sparse import SparseKV, sparse_store_layout
from kvtier.sparse.errors import BlocksNotStoredError, SparseWriteError
from kvtier.store.tiered import TieredStore
from kvtier.tiers.base import TierWriteError
from tests.sparse.helpers import LAYOUT, config, make_store

L, H, D, BT = 2, 2, 8, 4
BLOCKS = 20
CHUNK_BYTES = LAYOUT.num_layers * LAYOUT.num_kv_heads * 2 * BT * D * 4  # float32 K and V of a block
CHUNK_FILE = 11 << 12  # a chunk's file on disk for LAYOUT: header + 8 sections + summaries, 4 KiB-aligned


def small_disk_store(tmp_path, memory_bytes: int = 0) -> TieredStore:
    """A store whose disk tier holds fewer blocks than a request of BLOCKS blocks (DRAM: none, or
    `memory_bytes`), written through."""
    memory = MemoryTierConfig(capacity_bytes=memory_bytes) if memory_bytes else None
    disk = DiskTierConfig(root=str(tmp_path), capacity_bytes=BLOCKS // 2 * CHUNK_FILE)
    return TieredStore(StoreConfig(chunk_tokens=BT, memory=memory, disk=disk), sparse_store_layout(LAYOUT))


def prefill(kv: SparseKV, tokens: int = BLOCKS * BT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(L, H, tokens, D, generator=g), torch.randn(L, H, tokens, D, generator=g)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    return k, v


def on_disk(store: TieredStore) -> int:
    assert store.disk is not None
    return store.disk.usage().chunks


def test_flush_raises_for_blocks_a_full_disk_refused(tmp_path):
    store = small_disk_store(tmp_path)  # no DRAM tier: a refused block is in no tier
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"full")
    k, _ = prefill(kv)
    with pytest.raises(BlocksNotStoredError, match="refused by the disk tier") as raised:
        kv.flush()  # returned before: the refusal was only in SaveResult.errors
    kept = on_disk(store)
    assert 0 < kept < BLOCKS
    assert f"{BLOCKS - kept} blocks of this request were not stored" in str(raised.value)
    assert f"{BLOCKS - kept} in no tier of the store" in str(raised.value)
    # what the disk took is kept and still reads back as written
    assert store.lookup(kv.block_keys[:kept], touch=False).hits == kept
    out = torch.empty(1, 2, store.layer_bytes, dtype=torch.uint8)
    kv._store_gather(0, torch.tensor([1]).numpy(), torch.tensor([kept - 1]).numpy(), out.numpy())
    got = out.view(torch.float32).view(2, BT, D)
    assert torch.equal(got[0], k[0, 1, (kept - 1) * BT : kept * BT])
    with pytest.raises(BlocksNotStoredError):
        kv.close()
    store.close()


def test_decode_after_a_refused_save_says_why_rather_than_block_missing(tmp_path):
    store = small_disk_store(tmp_path)
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"decode")
    prefill(kv)
    g = torch.Generator().manual_seed(1)
    with pytest.raises(BlocksNotStoredError, match="in no tier of the store"):  # BlockMissingError before
        for _ in range(3):
            for layer in range(L):
                kv.attend(layer, torch.randn(2 * H, 1, D, generator=g), D ** -0.5)
    with pytest.raises(SparseWriteError):
        kv.close()
    store.close()


def test_the_next_prefill_chunk_raises_once_a_refusal_landed(tmp_path):
    store = small_disk_store(tmp_path)
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"early")
    prefill(kv)
    kv._writer.drain()
    store.flush()  # the refused disk writes have ended
    with pytest.raises(BlocksNotStoredError, match="refused by the disk tier"):
        prefill(kv, tokens=8 * BT, seed=2)  # the next chunk went on before, its blocks children of lost ones
    with pytest.raises(BlocksNotStoredError):
        kv.close()
    store.close()


def test_flush_raises_for_blocks_left_only_in_dram_when_the_disk_refused_them(tmp_path):
    store = small_disk_store(tmp_path, memory_bytes=1 << 20)  # write-through: DRAM evicts what disk holds
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"dram")
    prefill(kv)
    with pytest.raises(BlocksNotStoredError, match="only in DRAM, not written below it") as raised:
        kv.flush()
    assert f"{BLOCKS - on_disk(store)} blocks of this request were not stored" in str(raised.value)
    with pytest.raises(BlocksNotStoredError):
        kv.close()
    store.close()


def test_flush_raises_for_blocks_dram_had_no_slot_for_in_a_store_without_disk():
    store = make_store(memory_bytes=2 * CHUNK_BYTES)  # DRAM of two chunks, nothing below it
    kv = SparseKV(store, config("quest", budget=16, sinks=4, window=4), LAYOUT, salt=b"noslot")
    prefill(kv, tokens=2 * BT)
    kv.flush()  # two blocks: both in DRAM
    borrowed = store.borrow_memory(kv.block_keys)  # a reader holds them: DRAM has no slot to give
    prefill(kv, tokens=2 * BT, seed=3)
    with pytest.raises(BlocksNotStoredError, match=r"2 in no tier of the store \[2, 3\]"):
        kv.flush()  # passed before: SaveResult(2 chunks, 0 in memory, 0 on disk, no errors)
    store.release_borrowed(borrowed)
    with pytest.raises(BlocksNotStoredError):
        kv.close()
    store.close()


def test_a_second_flush_and_close_raise_after_a_failed_disk_write(tmp_path):
    store = make_store(memory_bytes=1 << 20, disk_root=str(tmp_path))
    assert store.disk is not None
    real = store.disk.write
    writes = 0
    appended = threading.Event()

    def failing_write(*a, **kw):  # the disk fails with EIO from the third chunk on
        nonlocal writes
        appended.wait(10)  # once every span is appended (a failure known earlier stops the next append)
        writes += 1
        if writes > 2:
            raise TierWriteError("disk tier: EIO writing a chunk")
        return real(*a, **kw)

    store.disk.write = failing_write
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"eio")
    for seed in range(3):  # three spans: three saves, the last two fail
        prefill(kv, tokens=2 * BT, seed=seed)
    appended.set()
    with pytest.raises((SparseWriteError, TierWriteError), match="EIO"):
        kv.flush()
    with pytest.raises(BlocksNotStoredError, match="4 blocks of this request were not stored"):
        kv.flush()  # passed before: the first flush had dropped the saves after the failed one
    with pytest.raises(BlocksNotStoredError):
        kv.close()
    store.close()


def test_a_failed_synchronous_save_is_raised_by_flush_and_close_too():
    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"sync", async_writes=False)
    prefill(kv, tokens=4 * BT)
    real = store.begin_save

    def broken(*a, **kw):
        raise OSError("disk full")

    store.begin_save = broken
    with pytest.raises(OSError, match="disk full"):
        prefill(kv, tokens=4 * BT, seed=1)
    store.begin_save = real
    with pytest.raises(SparseWriteError, match="disk full"):
        kv.flush()  # passed before: nothing but the append had heard of it
    with pytest.raises(SparseWriteError):
        kv.close()
    store.close()


@pytest.mark.parametrize("async_writes", [True, False])
def test_close_gives_back_the_dram_slots_of_a_span_left_open(async_writes):
    store = make_store(memory_bytes=1 << 20)
    assert store.memory is not None
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"open", async_writes=async_writes)
    k = torch.randn(L, H, 10 * BT, D)
    kv.append(0, k[0], k[0])  # the forward fails before layer 1: the span's save never commits
    kv.close()
    counts = store.memory.slot_counts()
    assert counts["reserved"] == 0 and counts["free"] == counts["slots"]  # 10 slots reserved for good before
    store.close()

