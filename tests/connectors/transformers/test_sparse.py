"""attn_implementation="kvtier_sparse": dense equality with stock attention, sparse decode, errors."""

from __future__ import annotations

import copy
import gc
import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache

from kvtier.bench.models import random_llama
from kvtier.connectors.transformers.sparse import (
    ATTN_NAME,
    KVTierSparseCache,
    check_supported,
    prefill,
    register,
    sparse_attention_forward,
)
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.errors import LayoutMismatchError
from kvtier.core.layout import KVLayout
from kvtier.sparse import SparseConfig, UnsupportedModelError, sparse_store_layout
from kvtier.store.tiered import TieredStore

BLOCK = 4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: on a shared 2-core CI box OpenMP threads stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    register()
    stock = random_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=1)
    stock.set_attn_implementation("sdpa")
    sparse = copy.deepcopy(stock)
    sparse.set_attn_implementation(ATTN_NAME)
    return stock, sparse


LAYOUT = KVLayout(2, 2, 16)  # the models' KV layout


def store(memory: int = 1 << 22) -> TieredStore:
    return TieredStore(StoreConfig(chunk_tokens=BLOCK, memory=MemoryTierConfig(capacity_bytes=memory)),
                       sparse_store_layout(LAYOUT))


def cfg(policy: str, budget: int, prefetch_blocks: int = 0) -> SparseConfig:
    return SparseConfig(policy=policy, budget_tokens=budget, block_tokens=BLOCK, sink_tokens=4, window_tokens=4,
                        prefetch_blocks=prefetch_blocks)


@pytest.mark.parametrize("policy,budget", [("dense", 12), ("quest", 256)])
def test_dense_through_the_sparse_path_equals_stock_sdpa(models, policy: str, budget: int) -> None:
    """Prefill and 6 decode steps of a left-padded batch of 2 (causal + padding masks)."""
    stock, sparse = models
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = KVTierSparseCache(store(), cfg(policy, budget), model_config=sparse.config)
    with torch.no_grad():
        ref = stock(ids, attention_mask=mask, past_key_values=DynamicCache(config=stock.config), use_cache=True)
        out = sparse(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert torch.allclose(ref.logits, out.logits, atol=1e-5)
        past = ref.past_key_values
        nxt = ref.logits[:, -1:].argmax(-1)
        for _ in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            r = stock(nxt, attention_mask=mask, past_key_values=past, use_cache=True)
            o = sparse(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            assert torch.allclose(r.logits, o.logits, atol=1e-5)
            nxt = r.logits[:, -1:].argmax(-1)


def test_chunked_prefill_is_exact(models) -> None:
    stock, sparse = models
    ids = torch.randint(3, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    cache = KVTierSparseCache(store(), cfg("quest", 16), layout=LAYOUT)
    with torch.no_grad():
        last = prefill(sparse, ids, cache, chunk_tokens=13)
        assert torch.allclose(last, stock(ids).logits[:, -1], atol=1e-5)
    assert cache.get_seq_length() == 45


def test_sparse_generate_stays_within_the_fast_tier_budget(models) -> None:
    _, sparse = models
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    config = cfg("quest", 16)
    cache = KVTierSparseCache(store(), config, model_config=sparse.config)
    with torch.no_grad():
        out = sparse.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == 60
    seq = cache.sequences[0]
    assert seq.num_tokens[0] == 59
    assert cache.fast_tier_bytes() <= seq.budget_bytes() + seq.summary_bytes()
    assert cache.fetched_bytes() > 0


def test_plain_cache_falls_back_to_dense(models) -> None:
    stock, sparse = models
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = stock.generate(ids, max_new_tokens=5, do_sample=False)
        b = sparse.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_layout_mismatch_is_refused(models) -> None:
    _, sparse = models
    bad = TieredStore(StoreConfig(chunk_tokens=BLOCK), sparse_store_layout(KVLayout(2, 4, 16)))
    with pytest.raises(LayoutMismatchError):
        KVTierSparseCache(bad, cfg("quest", 16), model_config=sparse.config)
    whole = TieredStore(StoreConfig(chunk_tokens=BLOCK), LAYOUT)  # the model's layout, not per head
    with pytest.raises(LayoutMismatchError, match="sparse_store_layout"):
        KVTierSparseCache(whole, cfg("quest", 16), model_config=sparse.config)
    with pytest.raises(LayoutMismatchError):
        KVTierSparseCache(whole, cfg("quest", 16), layout=LAYOUT)
    with pytest.raises(LayoutMismatchError, match="differs"):
        KVTierSparseCache(store(), cfg("quest", 16), model_config=sparse.config, layout=KVLayout(2, 2, 8))
    with pytest.raises(ValueError, match="model_config= or layout="):
        KVTierSparseCache(store(), cfg("quest", 16))


def test_a_store_of_another_dtype_is_refused(models) -> None:
    """Bug: a float32 model over a bfloat16 sparse store was accepted and its KV silently rounded
    (a full budget then no longer equalled dense), where the prefix connector refuses it."""
    _, sparse = models
    bf16 = TieredStore(StoreConfig(chunk_tokens=BLOCK, memory=MemoryTierConfig(capacity_bytes=1 << 22)),
                       sparse_store_layout(KVLayout(2, 2, 16, "bfloat16")))
    cache = KVTierSparseCache(bf16, cfg("dense", 12), model_config=sparse.config)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LayoutMismatchError, match="float32.*bfloat16"), torch.no_grad():
        sparse(input_ids=ids, past_key_values=cache, use_cache=True)


def test_unsupported_attention_is_refused() -> None:
    class Attn(torch.nn.Module):
        sliding_window = 128

    attn = Attn().eval()
    k = torch.zeros(1, 1, 2, 4)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_supported(attn, k, k, {})
    with pytest.raises(UnsupportedModelError, match="head sizes"):
        check_supported(torch.nn.Module().eval(), k, torch.zeros(1, 1, 2, 8), {})
    with pytest.raises(UnsupportedModelError, match="sinks"):
        sparse_attention_forward(torch.nn.Module().eval(), k, k, k, None, s_aux=torch.zeros(1))
    with pytest.raises(UnsupportedModelError, match="inference"):
        check_supported(torch.nn.Module().train(), k, k, {})


# -- dropping sequences: reset, a cache collected ---------------------------------------------
# Bug: SparseCacheLayer.reset() dropped the cache's SparseKVs without closing them: each reset
# leaked a prefetch thread (until a full collection found the request), kept the DRAM slots of a
# span whose save never committed, and silently lost the store's refusals of its saves. Closing
# them would raise the old request's errors into the next prompt: reset discards them instead.

def wait_until(ok: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_resets_with_prefetch_on_do_not_leak_threads(models) -> None:
    _, sparse = models
    cache = KVTierSparseCache(store(), cfg("quest", 16, prefetch_blocks=2), model_config=sparse.config)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    gc.disable()  # the collector ended a dropped request's prefetch thread, whenever it ran a full pass
    try:
        counts = []
        for _ in range(4):
            with torch.no_grad():
                sparse.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
            pf = cache.sequences[0]._prefetch
            assert pf is not None and pf.prefetched_slices > 0  # decode read ahead: its thread ran
            cache.reset()
            assert cache.sequences == [] and cache.get_seq_length() == 0
            counts.append(threading.active_count())
        # a writer's thread may take a moment to end after its last job
        assert wait_until(lambda: threading.active_count() <= counts[0], 5), counts  # grew by 1 per reset before
    finally:
        gc.enable()


def test_a_reset_mid_prefill_gives_back_the_dram_reservations(models) -> None:
    stock, sparse = models
    st = store()
    assert st.memory is not None
    cache = KVTierSparseCache(st, cfg("quest", 16), model_config=sparse.config)
    k = torch.randn(1, 2, 40, 16)
    cache.update(k, k, 0)  # a forward that failed after layer 0: its 10 blocks' save never commits
    assert wait_until(lambda: st.memory.slot_counts()["reserved"] == 10)
    cache.reset()
    counts = st.memory.slot_counts()
    assert counts["reserved"] == 0 and counts["free"] == counts["slots"]  # 10 slots kept for good before
    # the cache is reused for a new prompt: exact, as a fresh one
    ids = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sparse(ids, past_key_values=cache, use_cache=True)
        assert torch.allclose(stock(ids).logits, out.logits, atol=1e-5)
    cache.close()


def test_a_reset_after_a_refused_save_logs_instead_of_raising(models, caplog) -> None:
    _, sparse = models
    chunk = 2 * 2 * 2 * BLOCK * 16 * 4  # layers x KV heads x planes x tokens x head size x float32
    st = store(memory=4 * chunk)  # DRAM of 4 blocks, nothing below it: a 10-block save does not fit
    cache = KVTierSparseCache(st, cfg("quest", 16), model_config=sparse.config)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        sparse(ids, past_key_values=cache, use_cache=True)  # prefill: dense, reads nothing back
    cache.sequences[0]._writer.drain()  # its save committed, its refusal not yet checked
    with caplog.at_level(logging.WARNING, logger="kvtier.sparse.kv"):
        cache.reset()  # dropped it without a word before (and close would raise it into the next prompt)
    (record,) = [r for r in caplog.records if r.name == "kvtier.sparse.kv"]
    assert record.levelno == logging.WARNING
    assert "6 blocks of this request were not stored" in record.getMessage()
    cache.close()  # a new request, and none yet: nothing to raise


def test_a_collected_cache_gives_back_the_dram_reservations(models) -> None:
    _, sparse = models
    st = store()
    assert st.memory is not None
    cache = KVTierSparseCache(st, cfg("quest", 16), model_config=sparse.config)
    k = torch.randn(1, 2, 40, 16)
    cache.update(k, k, 0)
    assert wait_until(lambda: st.memory.slot_counts()["reserved"] == 10)
    del cache
    gc.collect()  # the cache refers to itself (its layers to their owner): a full pass finds it
    for t in threading.enumerate():
        if t.name == "kvtier-sparse-discard":
            t.join(30)
    assert st.memory.slot_counts()["reserved"] == 0  # reserved for the process's life before


EXIT_SCRIPT = """
import gc, torch
from kvtier.bench.models import random_llama
from kvtier.connectors.transformers.sparse import ATTN_NAME, KVTierSparseCache, register
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.sparse import SparseConfig, sparse_store_layout
from kvtier.store.tiered import TieredStore

register()
model = random_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=1)
model.set_attn_implementation(ATTN_NAME)
store = TieredStore(StoreConfig(chunk_tokens=4, memory=MemoryTierConfig(capacity_bytes=1 << 22)),
                    sparse_store_layout(KVLayout(2, 2, 16)))
cache = KVTierSparseCache(store, SparseConfig(policy="quest", budget_tokens=16, block_tokens=4, sink_tokens=4,
                                              window_tokens=4), model_config=model.config)
with torch.no_grad():
    model(torch.randint(3, 128, (1, 64)), past_key_values=cache, use_cache=True)
del cache
gc.collect()  # the finalizer hands the discard to a thread: the process exits while it runs
"""


def test_a_process_exiting_while_a_collected_cache_is_discarded_exits_cleanly() -> None:
    """Regression: the interpreter tore torch down under the finalizer's discard thread, still freeing
    tensors, and the process aborted at exit ("terminate called without an active exception")."""
    import subprocess
    import sys

    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
