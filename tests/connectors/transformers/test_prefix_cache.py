"""Prefix reuse through KVTierCache: exactness against a full recompute, on DRAM and disk hits."""

from __future__ import annotations

import pytest
import torch

from kvtier.connectors.transformers import (
    KVTierCache,
    PrefixLoadError,
    TransformersConnector,
    cache_kwarg,
    kvtier_generate,
)
from kvtier.core import metrics as m
from tests.connectors.transformers.prefix_util import (
    STORIES_SKIP,
    TOL,
    greedy_agree,
    hit_logits,
    last_logits,
    make_store,
    model_named,
    prompt,
    tiny_model,
)

MODELS = ["random", pytest.param("stories", marks=pytest.mark.skipif(STORIES_SKIP[0], reason=STORIES_SKIP[1]))]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {}


def get_model(models: dict, name: str) -> torch.nn.Module:
    if name not in models:
        models[name] = model_named(name)
    return models[name]


def reopen_disk_only_cache(model, root):
    """A fresh store on the same disk folder: DRAM empty, so every hit comes from disk."""
    return make_store(model, root)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tier", ["memory", "disk"])
@pytest.mark.parametrize("shape", ["full", "partial"])
def test_hit_logits_match_recompute(models, tmp_path, name, tier, shape):
    model = get_model(models, name)
    vocab = model.config.vocab_size
    ids = prompt(vocab, 27, seed=1)
    stored = ids if shape == "full" else ids[:, :14]  # partial: the store holds a prefix of this prompt
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    conn.prefill(stored)
    store.close()
    if tier == "memory":
        store = make_store(model, tmp_path)  # reopened, then warmed into DRAM by one disk load
        conn = TransformersConnector(model, store)
        conn.prefill(stored)
    else:
        store = make_store(model, tmp_path)
        conn = TransformersConnector(model, store)
    before = store.metrics.get(m.HITS, tier=tier)
    plan, got = hit_logits(conn, ids)
    expect = 24 if shape == "full" else 12  # whole chunks, never the last token
    assert plan.cached_tokens == (expect,)
    assert store.metrics.get(m.HITS, tier=tier) > before
    ref = last_logits(model, ids)
    assert (got - ref).abs().max().item() <= TOL
    store.close()


@pytest.mark.parametrize("name", MODELS)
def test_generate_greedy_matches(models, tmp_path, name):
    model = get_model(models, name)
    ids = prompt(model.config.vocab_size, 22, seed=2)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    first = kvtier_generate(model, ids, conn, max_new_tokens=12, do_sample=False, pad_token_id=0)
    second = kvtier_generate(model, ids, conn, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert conn.metrics.get(m.HIT_TOKENS, connector="transformers") == 20
    assert first.shape == second.shape == (1, 34)
    assert torch.equal(first[:, :22], ids)
    greedy_agree(model, ids, second, 12)
    greedy_agree(model, ids, first, 12)
    store.close()


def test_batch_rows_of_different_lengths_reuse_per_row(tmp_path):
    """Left-padded rows with different lengths and hits: each row reuses its own longest prefix
    (whole chunks), and its logits and greedy tokens equal running that row alone."""
    model = tiny_model()
    vocab = model.config.vocab_size
    base = prompt(vocab, 30, seed=3)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    conn.prefill(base[:, :21])  # stores 5 chunks
    rows = [base[0, :26], torch.cat([base[0, :9], prompt(vocab, 10, seed=4)[0]]), prompt(vocab, 13, seed=5)[0],
            base[0, :26]]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    plan, got = hit_logits(conn, ids, mask)
    assert plan.cached_tokens == (20, 8, 0, 20)  # rows 0 and 3 share their chunks (loaded once)
    for b, r in enumerate(rows):
        assert (got[b] - last_logits(model, r[None])[0]).abs().max().item() <= TOL
    out = kvtier_generate(model, ids, conn, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, :width], ids)
    for b, r in enumerate(rows):
        greedy_agree(model, r[None], torch.cat([r[None], out[b:b + 1, width:]], 1), 6)
    store.close()


def test_equal_rows_and_single_row_skip_leading_tokens(tmp_path):
    """The raw contract: with unpadded rows that hit equally, plan.input_ids is input_ids[:, n:]."""
    model = tiny_model()
    ids = prompt(model.config.vocab_size, 18, seed=6).repeat(2, 1)
    store = make_store(model, None)
    conn = TransformersConnector(model, store)
    conn.prefill(ids)
    cache = conn.new_cache()
    plan = cache.prepare(ids)
    assert plan.n_cached == 16 and plan.attention_mask is None and plan.position_ids is None
    assert torch.equal(plan.input_ids, ids[:, 16:])
    with torch.no_grad():
        out = model(ids[:, plan.n_cached:], **{cache_kwarg(model): cache})
    assert cache.get_seq_length() == 18
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max().item() <= TOL
    store.close()


def test_loads_wait_layer_by_layer(tmp_path):
    """Layer i waits for its own load only when layer i's attention runs, not before the forward."""
    model = tiny_model(num_layers=3)
    ids = prompt(model.config.vocab_size, 17, seed=7)
    store = make_store(model, None)
    TransformersConnector(model, store).prefill(ids)
    events: list[tuple[str, int]] = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner
            self.layout, self.chunk_tokens, self.config = inner.layout, inner.chunk_tokens, inner.config

        def lookup(self, keys):
            return self.inner.lookup(keys)

        def load(self, keys, dests, layers):
            h = self.inner.load(keys, dests, layers)
            layer = layers[0]

            class Handle:
                def wait(self_inner):
                    events.append(("wait", layer))
                    return h.wait()

            return Handle()

        def begin_save(self, *a):
            return self.inner.begin_save(*a)

    conn = TransformersConnector(model, Recording(store))
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda mod, args, i=i: events.append(("compute", i)))
    conn.prefill(ids)
    assert events == [("compute", 0), ("wait", 0), ("compute", 1), ("wait", 1), ("compute", 2), ("wait", 2)]
    store.close()


def test_cache_is_a_dynamic_cache_subclass():
    from transformers import DynamicCache

    model = tiny_model()
    store = make_store(model, None)
    assert isinstance(TransformersConnector(model, store).new_cache(), DynamicCache)
    assert issubclass(KVTierCache, DynamicCache)
    store.close()


def test_prefix_load_error_carries_the_verified_prefix(tmp_path):
    """The raw contract surfaces a failed load as PrefixLoadError; prefill() retries on its own."""
    model = tiny_model()
    ids = prompt(model.config.vocab_size, 21, seed=8)
    store = make_store(model, tmp_path)
    TransformersConnector(model, store).prefill(ids)
    store.close()
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    keys = conn.chunk_keys(ids[0].tolist())
    _corrupt(store, keys[2], layer=1)
    cache = conn.new_cache()
    plan = cache.prepare(ids)
    assert plan.cached_tokens == (20,)
    with pytest.raises(PrefixLoadError) as err, torch.no_grad():
        model(**plan.model_inputs(), **conn.cache_kwargs(cache))
    assert err.value.valid_chunks == (2,)
    store.close()


def _corrupt(store, key: bytes, layer: int) -> None:
    """Flip one payload byte of `layer` in the chunk's file (the header and the other layers stay valid)."""
    from kvtier.core.codec import SECTION_KV, decode_header

    path = store.disk.path_of(key)
    with open(path, "r+b") as f:
        data = f.read()
        header = decode_header(data)
        section = header.section(SECTION_KV, layer)
        f.seek(section.offset + 5)
        f.write(bytes([data[section.offset + 5] ^ 0xFF]))
