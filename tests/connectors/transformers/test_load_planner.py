"""Never slower than recomputing: the transformers connector loads only the prefix of a hit that pays."""

from __future__ import annotations

import pytest
import torch

from kvtier.connectors.transformers import TransformersConnector
from kvtier.core import metrics as m
from kvtier.store import probe
from kvtier.store.planner import ESTIMATES, CostEstimates
from kvtier.store.throttle import throttle_disk
from tests.connectors.transformers.prefix_util import TOL, hit_logits, last_logits, make_store, prompt, tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def stored_on_disk(model, root, ids):
    """Save ids' chunks, then reopen the store (DRAM empty): every hit is a disk hit."""
    store = make_store(model, root)
    TransformersConnector(model, store, plan_loads=False).prefill(ids)
    store.close()
    return make_store(model, root)


def test_slow_disk_is_recomputed_and_counted(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=5)
    store = stored_on_disk(model, tmp_path, ids)
    est = CostEstimates()
    throttle_disk(store, 1e-6, est)  # 1 kB/s: any chunk takes seconds
    conn = TransformersConnector(model, store, estimates=est)
    est.observe_compute(conn.engine_id, 1000, 1e-3)  # compute: 1 us per token
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (0,) and plan.skipped_tokens == (32,)
    assert conn.metrics.get(m.LOADS_SKIPPED, connector="transformers") == 8
    assert store.metrics.get(m.HITS, tier="disk") == 0  # nothing was read
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_fast_disk_is_loaded(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=6)
    store = stored_on_disk(model, tmp_path, ids)
    est = CostEstimates()
    conn = TransformersConnector(model, store, estimates=est)
    est.observe_compute(conn.engine_id, 10, 1.0)  # compute: 0.1 s per token
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (32,) and plan.skipped_tokens == (0,)
    assert conn.metrics.get(m.LOADS_SKIPPED, connector="transformers") == 0
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_dram_prefix_loaded_disk_tail_recomputed(model, tmp_path):
    """Chunks 0-3 in DRAM, 4-7 only on disk (throttled): load the DRAM head, recompute the rest."""
    ids = prompt(model.config.vocab_size, 33, seed=7)
    store = stored_on_disk(model, tmp_path, ids)
    est = CostEstimates()
    conn = TransformersConnector(model, store, estimates=est, plan_loads=False)
    conn.prefill(ids[:, :17])  # a disk load of chunks 0-3, promoted to DRAM
    throttle_disk(store, 1e-6, est)
    conn = TransformersConnector(model, store, estimates=est)
    est.observe_compute(conn.engine_id, 1000, 1e-3)
    assert conn.lookup(conn.chunk_keys(ids[0].tolist()))[1] == ("memory",) * 4 + ("disk",) * 4
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (16,) and plan.skipped_tokens == (16,)
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_without_compute_estimate_everything_loads(model, tmp_path):
    """Before any forward has been timed, today's behaviour: every stored chunk is loaded."""
    ids = prompt(model.config.vocab_size, 33, seed=8)
    store = stored_on_disk(model, tmp_path, ids)
    est = CostEstimates()
    throttle_disk(store, 1e-3, est)  # 1 MB/s
    conn = TransformersConnector(model, store, estimates=est)
    plan = conn.new_cache().prepare(ids)
    assert plan.cached_tokens == (32,)
    store.close()


def test_prefill_measures_compute_and_loads(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=9)
    store = make_store(model, tmp_path)
    est = CostEstimates()
    conn = TransformersConnector(model, store, estimates=est)
    assert est.bandwidth(conn.tier_id("memory")) is not None  # probed at open
    assert est.bandwidth(conn.tier_id("disk")) is not None
    assert est.seconds_per_token(conn.engine_id) is None
    conn.prefill(ids)  # a miss: times a forward over 33 tokens
    assert est.seconds_per_token(conn.engine_id) > 0
    before = est.snapshot()[conn.tier_id("memory")]["samples"]
    conn.prefill(ids)  # a DRAM hit: its loads are timed
    assert est.snapshot()[conn.tier_id("memory")]["samples"] == before + 1
    assert est.source(conn.tier_id("memory")) == "measured"
    store.close()


def test_estimates_survive_a_store_reopen(model, tmp_path, monkeypatch):
    ids = prompt(model.config.vocab_size, 21, seed=10)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store)  # the process-wide estimates
    conn.prefill(ids)
    disk_bw = ESTIMATES.bandwidth(conn.tier_id("disk"))
    spt = ESTIMATES.seconds_per_token(conn.engine_id)
    store.close()

    def no_probe(*a, **k):
        raise AssertionError("probed again although the process knows this disk")

    monkeypatch.setattr(probe, "disk_probe", no_probe)
    monkeypatch.setattr(probe, "memcpy_probe", no_probe)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store, fingerprint=conn.fingerprint)
    assert ESTIMATES.bandwidth(conn.tier_id("disk")) == disk_bw
    assert ESTIMATES.seconds_per_token(conn.engine_id) == spt
    store.close()


def test_plan_loads_off_loads_everything(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=11)
    store = stored_on_disk(model, tmp_path, ids)
    est = CostEstimates()
    throttle_disk(store, 1e-6, est)
    conn = TransformersConnector(model, store, estimates=est, plan_loads=False)
    est.observe_compute(conn.engine_id, 1000, 1e-3)
    assert conn.new_cache().prepare(ids).cached_tokens == (32,)
    store.close()


def _balanced(model, root, ids, seconds_per_chunk=2e-3):
    """ids stored on disk, the disk throttled so that loading a chunk is estimated to take as long as
    computing it: loading everything or nothing both cost the whole prefix; computing the head while
    the tail loads costs half of it."""
    store = stored_on_disk(model, root, ids)
    est = CostEstimates()
    conn = TransformersConnector(model, store, estimates=est)
    throttle_disk(store, conn.chunk_bytes / seconds_per_chunk / 1e9, est)
    est.observe_compute(conn.engine_id, conn.chunk_tokens * 1000, seconds_per_chunk * 1000)
    return store, conn


def test_head_computed_while_the_tail_loads(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=12)
    store, conn = _balanced(model, tmp_path, ids)
    plan, got = hit_logits(conn, ids)
    assert plan.head_tokens == (16,) and plan.cached_tokens == (16,) and plan.skipped_tokens == (0,)
    assert plan.n_cached == 32 and plan.input_ids.shape == (1, 1)
    assert store.metrics.get(m.HITS, tier="disk") == 4  # the tail's chunks only were read
    assert conn.metrics.get(m.HEAD_TOKENS, connector="transformers") == 16
    assert conn.metrics.get(m.HIT_TOKENS, connector="transformers") == 16
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_head_plan_generates_as_plain(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=13)
    store, conn = _balanced(model, tmp_path, ids)
    out = conn.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert conn.metrics.get(m.HEAD_TOKENS, connector="transformers") == 16
    store.close()


def test_head_plan_with_a_corrupt_tail_chunk_recomputes_from_it(model, tmp_path):
    from tests.connectors.transformers.test_prefix_cache import _corrupt

    ids = prompt(model.config.vocab_size, 33, seed=14)
    store, conn = _balanced(model, tmp_path, ids)
    keys = conn.chunk_keys(ids[0].tolist())
    _corrupt(store, keys[6], layer=1)
    plan, got = hit_logits(conn, ids)
    assert sum(plan.head_tokens) + sum(plan.cached_tokens) <= 24  # chunk 6 on was recomputed
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") >= 1
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_no_head_for_a_batch_or_without_overlap(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=15)
    store, conn = _balanced(model, tmp_path, ids)
    assert conn.new_cache().prepare(ids).head_input_ids is None  # the raw contract: one forward
    assert conn.new_cache().prepare(ids, head=True, overlap=False).head_tokens == (0,)
    both = torch.cat([ids, ids])
    plan = conn.new_cache().prepare(both, head=True)
    assert plan.head_input_ids is None and plan.head_tokens == (0, 0)
    store.close()


def test_a_head_forward_over_more_than_the_head_is_refused(model, tmp_path):
    ids = prompt(model.config.vocab_size, 33, seed=16)
    store, conn = _balanced(model, tmp_path, ids)
    cache = conn.new_cache()
    plan = cache.prepare(ids, head=True)
    assert plan.head_tokens == (16,)
    with pytest.raises(ValueError, match="head"), torch.no_grad():
        model(input_ids=ids[:, :20], **conn.cache_kwargs(cache), use_cache=True)
    cache.discard()
    store.close()
