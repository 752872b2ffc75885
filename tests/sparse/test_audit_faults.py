"""Sparse KV faults an audit found:

- blocks were keyed by (salt, block index) alone, so a cache reset for the next prompt with the
  same salts, or two requests given one salt, read the first one's KV (the store keeps a key's
  first copy);
- a decode right after prefill raised BlockMissingError for blocks that had no DRAM slot (no
  DRAM tier, or DRAM full of chunks pinned for their disk writes) until their disk write landed;
- close() after a failed write left the prefetcher running, and the cache's close stopped at
  the first row that raised;
- bad config values and query head counts were bare Python errors.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvtier.connectors.transformers.sparse import KVTierSparseCache
from kvtier.core.errors import KVTierError
from kvtier.sparse import SparseConfig, SparseKV
from kvtier.sparse.errors import SparseConfigError, SparseWriteError
from tests.sparse.helpers import LAYOUT, config, make_store

L, H, D, BT = 2, 2, 8, 4


def test_a_reset_cache_with_the_same_salts_reads_its_own_kv():
    store = make_store()
    cache = KVTierSparseCache(store, config("quest", budget=16), layout=LAYOUT, salts=[b"row0"])
    g = torch.Generator().manual_seed(0)
    for prompt in range(2):
        k, v = torch.randn(L, H, 40, D, generator=g), torch.randn(L, H, 40, D, generator=g)
        for layer in range(L):
            cache.layers[layer].update(k[layer][None], v[layer][None])
        cache.flush()
        got_k, got_v = cache.sequences[0]._fetch(0, [5])  # block 5 of layer 0, as decode reads it
        assert torch.equal(got_k[0], k[0, :, 20:24]) and torch.equal(got_v[0], v[0, :, 20:24]), prompt
        cache.reset()
    store.close()


def test_two_sequences_given_one_salt_never_share_blocks():
    store = make_store()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"memory")
        k, v = torch.randn(L, H, 40, D, generator=g), torch.randn(L, H, 40, D, generator=g)
        for layer in range(L):
            kv.append(layer, k[layer], v[layer])
        kv.flush()
        got, _ = kv._fetch(0, [3])
        assert torch.equal(got[0], k[0, :, 12:16])  # the first sequence's KV before
        kv.close()
    store.close()


@pytest.mark.parametrize("memory_bytes", [0, 2 * 512])  # no DRAM tier; DRAM of two chunks
def test_decode_right_after_prefill_finds_blocks_that_had_no_dram_slot(memory_bytes, tmp_path):
    store = make_store(memory_bytes=memory_bytes, disk_root=str(tmp_path))
    real = store.disk.write

    def slow_write(*a, **kw):  # a disk write that takes a moment
        time.sleep(0.05)
        return real(*a, **kw)

    store.disk.write = slow_write
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"slow")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(L, H, 40, D, generator=g), torch.randn(L, H, 40, D, generator=g)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    try:
        out = kv.attend(0, torch.randn(2 * H, 1, D, generator=g), D ** -0.5)  # BlockMissingError before
        assert out.shape == (2 * H, 1, D) and torch.isfinite(out).all()
    finally:
        kv.close()
        store.close()


def test_close_after_a_failed_write_stops_the_prefetcher_too():
    store = make_store(memory_bytes=1 << 24)
    kv = SparseKV(store, config("quest", budget=64, window=8, prefetch_blocks=4), LAYOUT, salt=b"leak")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(L, H, 512, D, generator=g), torch.randn(L, H, 512, D, generator=g)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    for _ in range(3):
        q = torch.randn(2 * H, 1, D, generator=g)
        for layer in range(L):
            kv.attend(layer, q, D ** -0.5)

    def broken(*a):
        raise OSError("disk full")

    store.begin_save = broken
    with pytest.raises(SparseWriteError):
        for layer in range(L):  # completes a block: its save fails on the writer
            kv.append(layer, k[layer, :, :BT], v[layer, :, :BT])
        kv.flush()
    with pytest.raises(SparseWriteError):
        kv.close()
    assert kv._prefetch._pool is None  # its thread pool outlived the close before
    store.close()


def test_the_caches_close_closes_every_row_and_raises_the_first_error():
    store = make_store(memory_bytes=1 << 24)
    cache = KVTierSparseCache(store, config("quest", budget=64, window=8), layout=LAYOUT)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(L, 2, H, 64, D, generator=g)
    for layer in range(L):
        cache.layers[layer].update(k[layer], k[layer])
    s0, s1 = cache.sequences
    s0._writer._error = OSError("disk full")  # row 0's background write failed
    with pytest.raises(SparseWriteError):
        cache.close()
    assert s0._writer._closed and s1._writer._closed  # row 1 was neither flushed nor closed before
    store.close()


@pytest.mark.parametrize("kw", [dict(policy=["quest"]), dict(summary_seed="x"), dict(summary_seed=2**70),
                                dict(summary_seed=-1), dict(summary_seed=True)])
def test_bad_config_values_are_config_errors(kw):
    with pytest.raises(SparseConfigError):
        SparseConfig(**kw)


def test_attend_dense_checks_the_query_heads_as_attend_does():
    kv = SparseKV(make_store(), config("quest", budget=16), LAYOUT, salt=b"y")
    k = torch.randn(2, 2, 30, 8)
    for layer in range(2):
        kv.append(layer, k[layer], k[layer])
    for attend, q in ((kv.attend, torch.randn(3, 1, 8)), (kv.attend_dense, torch.randn(3, 2, 8))):
        with pytest.raises(KVTierError, match="query heads"):
            attend(0, q, 0.3)  # attend_dense: a RuntimeError from a reshape deep inside before
    kv.close()
