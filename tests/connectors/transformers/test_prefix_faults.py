"""Prefix reuse: namespaces never mix, and faults fall back to recompute with identical output."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from kvtier.connectors.transformers import (
    TransformersConnector,
    UnsupportedModelError,
    check_full_kv,
    kvtier_generate,
    model_identity,
)
from kvtier.connectors.transformers.connector import SAVE_FAILURES
from kvtier.core import metrics as m
from kvtier.core.errors import LayoutMismatchError
from tests.connectors.transformers.prefix_util import (
    TOL,
    greedy_agree,
    hit_logits,
    last_logits,
    make_store,
    prompt,
    tiny_model,
)
from tests.connectors.transformers.test_prefix_cache import _corrupt

LOGGER = "kvtier.connectors.transformers.connector"


def _hits(conn, ids) -> int:
    return conn.lookup(conn.chunk_keys(ids[0].tolist()))[0]


def test_other_model_weights_or_tenant_never_share(tmp_path):
    model = tiny_model(seed=0)
    other = tiny_model(seed=1)  # same config, other weights
    ids = prompt(128, 21, seed=10)
    store = make_store(model, tmp_path)
    TransformersConnector(model, store).prefill(ids)
    assert _hits(TransformersConnector(model, store), ids) == 5
    assert model_identity(model) != model_identity(other)
    assert _hits(TransformersConnector(other, store), ids) == 0
    assert _hits(TransformersConnector(model, store, tenant_salt="tenant-b"), ids) == 0
    assert _hits(TransformersConnector(model, store, fingerprint="another-revision"), ids) == 0
    plan, got = hit_logits(TransformersConnector(other, store), ids)
    assert plan.cached_tokens == (0,)
    assert (got - last_logits(other, ids)).abs().max().item() <= TOL
    store.close()


def test_other_dtype_or_layout_never_shares(tmp_path):
    model = tiny_model()
    ids = prompt(128, 21, seed=11)
    store = make_store(model, tmp_path)
    TransformersConnector(model, store).prefill(ids)
    with pytest.raises(LayoutMismatchError):
        TransformersConnector(tiny_model(kv_heads=4), store)  # a store serves one layout
    store.close()
    half = tiny_model().to(torch.bfloat16)  # same weights rounded, other dtype: other layout and namespace
    store = make_store(half, tmp_path)
    assert _hits(TransformersConnector(half, store), ids) == 0
    store.close()
    wider = tiny_model(kv_heads=4)
    store = make_store(wider, tmp_path)
    conn = TransformersConnector(wider, store)
    assert _hits(conn, ids) == 0
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (0,)
    assert (got - last_logits(wider, ids)).abs().max().item() <= TOL
    store.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_corrupt_chunk_in_the_middle_recomputes_from_it(tmp_path, caplog, overlap):
    model = tiny_model()
    ids = prompt(128, 27, seed=12)
    store = make_store(model, tmp_path)
    TransformersConnector(model, store).prefill(ids)
    store.close()
    store = make_store(model, tmp_path)  # DRAM empty: the chunks come from disk
    conn = TransformersConnector(model, store, overlap=overlap)
    keys = conn.chunk_keys(ids[0].tolist())
    _corrupt(store, keys[3], layer=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache, out = conn.prefill(ids)
        cache2, out2 = conn.prefill(ids)  # the recomputed chunk was saved again: a full hit now
    assert cache.last_plan.cached_tokens == (12,)
    assert cache2.last_plan.cached_tokens == (24,)
    ref = last_logits(model, ids)
    assert (out.logits[:, -1] - ref).abs().max().item() <= TOL
    assert (out2.logits[:, -1] - ref).abs().max().item() <= TOL
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") >= 1
    assert len([r for r in caplog.records if r.name == LOGGER]) <= 1
    store.close()


def test_missing_chunk_in_the_middle_recomputes_from_it(tmp_path):
    model = tiny_model()
    ids = prompt(128, 27, seed=13)
    store = make_store(model, tmp_path)
    TransformersConnector(model, store).prefill(ids)
    store.close()
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    keys = conn.chunk_keys(ids[0].tolist())
    import os

    os.unlink(store.disk.path_of(keys[2]))  # gone behind the index's back: found by lookup, fails to load
    out = kvtier_generate(model, ids, conn, max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy_agree(model, ids, out, 8)
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (24,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") >= 1
    store.close()


@pytest.mark.parametrize("length", [0, 1, 3])
def test_empty_and_short_prompts(tmp_path, length):
    model = tiny_model()
    model.generation_config.bos_token_id = 1
    ids = prompt(128, length, seed=14)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    out = kvtier_generate(model, ids, conn, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref_ids = ids if length else torch.ones((1, 1), dtype=torch.long)
    ref = model.generate(ref_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    cache = conn.new_cache()
    plan = cache.prepare(ids)
    assert plan.cached_tokens == (0,)
    store.flush()
    assert store.stats()["memory"]["chunks"] == 0  # nothing full to save
    store.close()


def test_store_full_still_generates_and_logs_once(tmp_path, caplog):
    model = tiny_model()
    layer_chunk = make_store(model, None).layout.chunk_bytes(4)
    store = make_store(model, None, memory=2 * layer_chunk)  # DRAM for 2 chunks, no disk
    conn = TransformersConnector(model, store)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for seed in (15, 16, 17):
            ids = prompt(128, 30, seed=seed)
            out = kvtier_generate(model, ids, conn, max_new_tokens=4, do_sample=False, pad_token_id=0)
            greedy_agree(model, ids, out, 4)
    assert conn.metrics.get(SAVE_FAILURES, connector="transformers") > 0
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    store.close()


def test_read_only_store_still_generates(tmp_path, caplog):
    model = tiny_model()
    (tmp_path / "chunks").mkdir()
    store = make_store(model, tmp_path, memory=None, read_only=True)
    conn = TransformersConnector(model, store)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for seed in (18, 19):
            ids = prompt(128, 22, seed=seed)
            plan, got = hit_logits(conn, ids)
            store.flush()
            assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    assert conn.metrics.get(SAVE_FAILURES, connector="transformers") > 0
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    store.close()


def test_disk_tier_vanishing_mid_run(tmp_path, caplog):
    model = tiny_model()
    root = tmp_path / "disk"
    ids = prompt(128, 25, seed=20)
    store = make_store(model, root)
    TransformersConnector(model, store).prefill(ids)
    store.close()
    store = make_store(model, root)  # chunks indexed on disk only
    conn = TransformersConnector(model, store)
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        plan, got = hit_logits(conn, ids)  # lookup finds them, every load fails: recompute
        assert (got - last_logits(model, ids)).abs().max().item() <= TOL
        other = prompt(128, 25, seed=21)
        out = kvtier_generate(model, other, conn, max_new_tokens=4, do_sample=False, pad_token_id=0)
        greedy_agree(model, other, out, 4)
        store.flush()
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") >= 1
    assert len([r for r in caplog.records if r.name == LOGGER and "load" in r.getMessage()]) == 1
    plan, got = hit_logits(conn, ids)  # the recomputed chunks were kept in DRAM
    assert plan.cached_tokens == (24,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    store.close()


def test_client_api_store(tmp_path):
    from kvtier.client import InProcessClient

    model = tiny_model()
    ids = prompt(128, 19, seed=22)
    client = InProcessClient(make_store(model, tmp_path))
    conn = TransformersConnector(model, client)
    conn.prefill(ids)
    client.flush()
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (16,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    client.close()


def test_models_that_drop_tokens_are_refused(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        check_full_kv(model)
    with pytest.raises(UnsupportedModelError):
        TransformersConnector(model, make_store(tiny_model(), None))
    check_full_kv(tiny_model())


def _held(store) -> tuple[int, int]:
    """(DRAM reservations, references on resident chunks) the store holds for someone."""
    mem = store.memory
    return len(mem._reserved), sum(e.refs for e in mem._index.values())  # noqa: SLF001


def test_a_forward_that_fails_gives_back_what_its_prefill_held_at_once(tmp_path):
    """Bug: only a PrefixLoadError was handled; any other failure (out of memory, an interrupt)
    left the prefill's borrowed chunks and reserved save slots held until a garbage-collection
    pass happened to free the cache (it refers to itself through its layers)."""
    import gc

    model = tiny_model(num_layers=3)
    ids = prompt(model.config.vocab_size, 30, seed=1)
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False, direct_loads=True, direct_saves=True)
    conn.prefill(ids[:, :13])

    def boom(module, args):
        raise RuntimeError("CUDA out of memory (simulated)")

    hook = model.model.layers[2].register_forward_pre_hook(boom)
    gc.disable()  # nothing may depend on a collection
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            conn.prefill(ids)
        assert _held(store) == (0, 0)
    finally:
        gc.enable()
        hook.remove()
    conn.prefill(ids)  # and the next prefill runs as usual
    assert _held(store) == (0, 0)


def test_a_refused_generate_gives_back_its_borrowed_chunks(tmp_path):
    model = tiny_model()
    ids = prompt(128, 13, seed=1)
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False, direct_loads=True)
    conn.prefill(ids)
    with pytest.raises(LayoutMismatchError):
        kvtier_generate(model, ids, conn, max_new_tokens=3, pad_token_id=0, num_beams=2)
    assert _held(store) == (0, 0)


def test_max_length_counts_the_callers_prompt_when_rows_hit_unequally(tmp_path):
    """Bug: with rows hitting the store unequally generate runs on a wider input, and transformers
    counted max_length over it: fewer new tokens than model.generate gave, or an error."""
    model = tiny_model()
    vocab = model.config.vocab_size
    base = prompt(vocab, 30, seed=3)
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False)
    conn.prefill(base[:, :21])  # 5 chunks of 4 stored
    rows = [base[0, :26], prompt(vocab, 13, seed=5)[0]]
    ids = torch.zeros((2, 26), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):  # left padded
        ids[b, 26 - len(row):], mask[b, 26 - len(row):] = row, 1
    for kwargs in ({"max_length": 30}, {"max_length": 34, "min_length": 33}):
        ref = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
        got = kvtier_generate(model, ids, conn, mask, do_sample=False, pad_token_id=0, **kwargs)
        assert got.shape == ref.shape and torch.equal(got[:, :26], ids)
    with pytest.raises(ValueError, match="max_length"):
        kvtier_generate(model, ids, conn, mask, max_length=26, do_sample=False, pad_token_id=0)


def test_weights_changed_in_place_get_keys_of_their_own(tmp_path):
    """A fine-tuning step or load_state_dict after the connector was made: the old weights' KV must not
    be served for the new weights (it was: the fingerprint was taken once, at the connector's start)."""
    model = tiny_model(seed=0)
    ids = prompt(128, 21, seed=12)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)
    conn.prefill(ids)
    before = conn.fingerprint
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # in place, as an optimizer step
    plan, got = hit_logits(conn, ids)
    assert conn.fingerprint != before and plan.cached_tokens == (0,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    assert hit_logits(conn, ids)[0].cached_tokens == (20,)  # the new weights' own chunks, saved just now
    model.load_state_dict(old)  # back to the first weights: their chunks are found again
    plan, got = hit_logits(conn, ids)
    assert conn.fingerprint == before and plan.cached_tokens == (20,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    # a parameter replaced by another tensor (not written in place) is seen too
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    assert hit_logits(conn, ids)[0].cached_tokens == (0,)
    assert not conn.refresh_identity()  # nothing changed since
    store.close()


def test_an_explicit_fingerprint_is_not_second_guessed(tmp_path):
    model = tiny_model(seed=0)
    ids = prompt(128, 21, seed=13)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store, fingerprint="rev-1")
    conn.prefill(ids)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not conn.refresh_identity() and conn.fingerprint == "rev-1"
    store.close()
