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
