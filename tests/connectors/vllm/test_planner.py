"""The vLLM connector's load planner (issue 17, "never slower than recomputing"): the scheduler
loads a hit from below DRAM only where its tier's measured read bandwidth beats the engine's
measured prefill speed; the workers time forwards without loads and send (tokens, seconds) to
the scheduler. With fake requests, the CPU worker and a real in-process store (memory + disk)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from kvtier.client.api import InProcessClient
from kvtier.connectors.vllm.connector import KVTierConnector, KVTierWorkerMetadata
from kvtier.connectors.vllm.plan import LoadSpec, StepPlan
from kvtier.core import metrics as m
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.store.planner import CostEstimates
from kvtier.store.tiered import TieredStore

from .sim import BLOCK, LAYOUT, FakeRequest, Sim

PROMPT = list(range(300, 313))  # 13 tokens: 3 whole chunks of 4 + 1
CHUNK_BYTES = LAYOUT.chunk_bytes(BLOCK)


def disk_sim(tmp_path, estimates: CostEstimates, throttle_gbps: float = 0.0) -> Sim:
    cfg = StoreConfig(chunk_tokens=BLOCK, memory=MemoryTierConfig(capacity_bytes=64 * CHUNK_BYTES),
                      disk=DiskTierConfig(root=str(tmp_path), capacity_bytes=1 << 24, read_throttle_gbps=throttle_gbps))
    sim = Sim(InProcessClient(TieredStore(cfg, LAYOUT)))
    sim.sched.chunk_bytes = CHUNK_BYTES
    sim.sched.plan_loads = True
    sim.sched.estimates = estimates
    return sim


def stored_on_disk_only(sim: Sim, req: str, chunks: list[int]) -> list[bytes]:
    """Save `req`'s prompt, then drop `chunks` from DRAM: those hits come from the disk tier."""
    sim.client.flush()
    keys = sim.sched.reqs[req].chain.keys
    for i in chunks:
        assert sim.client.store.memory.delete(keys[i])
    return keys


def read_gbps(sim: Sim, monkeypatch: pytest.MonkeyPatch, disk_gbps: float | None) -> None:
    """What the store reports of its tiers' read bandwidth (GB/s); DRAM's is never used."""
    monkeypatch.setattr(sim.client, "stats", lambda: {"memory": {"read_gbps": 1e-9}, "disk": {"read_gbps": disk_gbps},
                                                      "metrics": {}})
    sim.sched._bandwidths_at = float("-inf")  # noqa: SLF001 - asked again now


def admit_and_run(sim: Sim, req: FakeRequest) -> int:
    ext = sim.admit(req)
    sim.step({req: req.num_tokens - req.num_computed_tokens})
    return ext


@pytest.mark.parametrize(("disk_gbps", "hit"), [
    (CHUNK_BYTES / 0.010 / 1e9, 4),  # a chunk loads in 10 ms, computes in 4 ms: the disk chunks are recomputed
    (CHUNK_BYTES / 0.001 / 1e9, 12),  # loads in 1 ms: every hit is loaded
    (None, 12),  # the disk was never read: unknown bandwidth loads (today's behaviour)
])
def test_disk_hits_slower_than_computing_are_recomputed(tmp_path, monkeypatch, disk_gbps, hit) -> None:
    est = CostEstimates()
    sim = disk_sim(tmp_path, est)
    admit_and_run(sim, FakeRequest("a", PROMPT))
    stored_on_disk_only(sim, "a", [1, 2])
    sim.sched.observe_compute([(1000, 1.0)])  # 1 ms per token: 4 ms per chunk
    read_gbps(sim, monkeypatch, disk_gbps)
    b = FakeRequest("b", PROMPT)
    assert admit_and_run(sim, b) == hit
    assert sim.tokens_are_right(b, 0, 13) and not sim.failed
    assert sim.sched.stats["planner_recomputed_chunks"] == (12 - hit) // BLOCK
    assert sim.leases() == 0
    if hit == 4:  # the recomputed chunks were saved again: into DRAM, where the next request finds them
        assert sim.client.lookup(sim.sched.reqs["b"].chain.keys[:3]).tiers == ("memory",) * 3


def test_hits_cut_by_the_planner_are_trimmed_from_the_lease(tmp_path, monkeypatch) -> None:
    """The lease keeps only the hits that will load: the cut ones' pins end at once and their
    disk promotions not started never read (before, they read and stayed pinned until the
    worker's release, spending the disk on chunks vLLM recomputes)."""
    est = CostEstimates()
    sim = disk_sim(tmp_path, est)
    admit_and_run(sim, FakeRequest("a", PROMPT))
    keys = stored_on_disk_only(sim, "a", [1, 2])
    sim.sched.observe_compute([(1000, 1.0)])  # 4 ms per chunk
    read_gbps(sim, monkeypatch, CHUNK_BYTES / 0.010 / 1e9)  # a disk chunk in 10 ms: chunks 1 and 2 cut
    host = sim.client._host  # noqa: SLF001
    store = sim.client.store
    gate, reads = threading.Event(), []
    real = store.read_lower

    def held_read(key, layers, dests):  # the promotions' disk reads wait until the trim is done
        reads.append(key)
        assert gate.wait(10)
        return real(key, layers, dests)

    monkeypatch.setattr(store, "read_lower", held_read)
    monkeypatch.setattr(host, "_promoter", ThreadPoolExecutor(1))  # one read at a time: chunk 2's is queued
    b = FakeRequest("b", PROMPT)
    assert sim.sched.num_new_matched_tokens(b, 0) == 4
    lease = sim.sched.reqs["b"].lease
    assert lease is not None and lease.hits == 1 and lease.tiers == ("memory",)
    gate.set()
    host._promoter.shutdown(wait=True)  # noqa: SLF001 - the promotion under way ends
    assert reads == [keys[1]]  # chunk 2's promotion was cancelled before it read
    assert store.memory.slot_counts()["pinned"] == 1  # only the chunk that loads is still pinned
    sim.blocks["b"] = [sim.free.pop() for _ in range(-(-b.num_tokens // sim.block_size))]  # as Sim.admit
    sim.sched.after_alloc(b, sim.blocks["b"], 4)
    b.num_computed_tokens = 4
    sim.step({b: b.num_tokens - 4})
    assert sim.tokens_are_right(b, 0, 13) and not sim.failed
    assert sim.leases() == 0 and store.memory.slot_counts()["pinned"] == 0


def test_a_configured_disk_throttle_reaches_the_planner_through_the_stores_stats(tmp_path) -> None:
    """No stand-in for the store's stats: the disk tier's `read_throttle_gbps` (what `kvtier bench
    vllm`'s kvtier_disk_slow run sets in its service config) is the bandwidth the store reports
    before any disk read, so the first disk hit is already recomputed."""
    est = CostEstimates()
    sim = disk_sim(tmp_path, est, throttle_gbps=CHUNK_BYTES / 0.010 / 1e9)  # a chunk in 10 ms
    admit_and_run(sim, FakeRequest("a", PROMPT))
    stored_on_disk_only(sim, "a", [1, 2])
    assert sim.client.store.disk.metrics.get(m.BYTES_READ, tier="disk") == 0  # never read yet
    sim.sched.observe_compute([(1000, 1.0)])  # 4 ms per chunk
    sim.sched._bandwidths_at = float("-inf")  # noqa: SLF001 - asked again now
    b = FakeRequest("b", PROMPT)
    assert admit_and_run(sim, b) == 4
    assert sim.tokens_are_right(b, 0, 13) and not sim.failed
    assert sim.sched.stats["planner_recomputed_chunks"] == 2 and sim.leases() == 0


def test_no_compute_estimate_or_planner_off_loads_every_hit(tmp_path, monkeypatch) -> None:
    for planner_on, samples in ((True, []), (False, [(1000, 1.0)])):
        est = CostEstimates()
        sim = disk_sim(tmp_path / str(planner_on), est)
        sim.sched.plan_loads = planner_on
        admit_and_run(sim, FakeRequest("a", PROMPT))
        stored_on_disk_only(sim, "a", [0, 1, 2])
        sim.sched.observe_compute(samples)
        read_gbps(sim, monkeypatch, 1e-9)  # a disk far slower than anything
        assert admit_and_run(sim, FakeRequest("b", PROMPT)) == 12


def test_every_hit_recomputed_releases_the_lease(tmp_path, monkeypatch) -> None:
    est = CostEstimates()
    sim = disk_sim(tmp_path, est)
    admit_and_run(sim, FakeRequest("a", PROMPT))
    stored_on_disk_only(sim, "a", [0, 1, 2])
    sim.sched.observe_compute([(100, 1.0)])
    read_gbps(sim, monkeypatch, 1e-9)
    b = FakeRequest("b", PROMPT)
    assert sim.sched.num_new_matched_tokens(b, 0) == 0
    assert sim.sched.reqs["b"].lease is None and sim.leases() == 0
    assert sim.sched.stats["planner_recomputed_chunks"] == 3


def test_dram_hits_are_always_loaded(tmp_path, monkeypatch) -> None:
    est = CostEstimates()
    sim = disk_sim(tmp_path, est)
    admit_and_run(sim, FakeRequest("a", PROMPT))
    sim.sched.observe_compute([(10**9, 1.0)])  # absurdly fast compute
    read_gbps(sim, monkeypatch, 1e-9)  # and a store that says DRAM is slow: DRAM hits load anyway
    assert admit_and_run(sim, FakeRequest("b", PROMPT)) == 12
    assert sim.sched.stats["planner_recomputed_chunks"] == 0


def test_worker_times_forwards_without_loads_only() -> None:
    sim = Sim()
    w = sim.worker
    assert w.take_compute_samples() == []
    for plan in (StepPlan(computed_tokens=64), StepPlan(computed_tokens=2 * BLOCK),  # too short to time
                 StepPlan(loads=[LoadSpec("r", [], [], [], None)], computed_tokens=64), StepPlan(computed_tokens=16)):
        w.start_step(plan)
        w.start_loads()
        w.finish_step()
    samples = w.take_compute_samples()
    assert [t for t, _ in samples] == [64, 16] and all(s > 0 for _, s in samples)
    assert w.take_compute_samples() == []


def test_worker_metadata_reaches_the_scheduler_estimates() -> None:
    a = KVTierWorkerMetadata([(64, 0.5)])
    merged = a.aggregate(KVTierWorkerMetadata([(32, 0.25)]))
    assert isinstance(merged, KVTierWorkerMetadata) and merged.compute == [(64, 0.5), (32, 0.25)]
    est = CostEstimates()
    sim = Sim()
    sim.sched.estimates = est
    fake = SimpleNamespace(scheduler=sim.sched)
    KVTierConnector.update_connector_output(fake, SimpleNamespace(invalid_block_ids=set(),  # type: ignore[arg-type]
                                                                  kv_connector_worker_meta=merged))
    assert est.seconds_per_token(sim.sched.engine_id) == pytest.approx(0.75 / 96)
    worker_side = SimpleNamespace(worker=SimpleNamespace(take_compute_samples=lambda: [(16, 0.1)]))
    built = KVTierConnector.build_connector_worker_meta(worker_side)  # type: ignore[arg-type]
    assert isinstance(built, KVTierWorkerMetadata) and built.compute == [(16, 0.1)]
    idle = SimpleNamespace(worker=SimpleNamespace(take_compute_samples=lambda: []))
    assert KVTierConnector.build_connector_worker_meta(idle) is None  # type: ignore[arg-type]
