"""attn_implementation="kvtier_sparse": dense equality with stock attention, sparse decode, errors."""

from __future__ import annotations

import copy

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


def cfg(policy: str, budget: int) -> SparseConfig:
    return SparseConfig(policy=policy, budget_tokens=budget, block_tokens=BLOCK, sink_tokens=4, window_tokens=4)


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
