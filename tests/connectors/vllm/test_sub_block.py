"""Chunks smaller than vLLM's block (store chunk 4 tokens, vLLM block 8 or 16): scheduler
bookkeeping, the worker's staged layer-by-layer loads, and the CPU adapter's strided copies."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kvtier.connectors.vllm.layouts import CpuPageAdapter, SplitLastAdapter, UnsupportedLayoutError
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, StepPlan
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import LoadResult

from .sim import BLOCK, LAYERS, LAYOUT, FakeRequest, Sim, write_cpu_token

PROMPT = list(range(100, 113))  # 13 tokens: 3 chunks of 4 + 1; blocks of 8: one full, one of 5


def prefill(sim: Sim, req: FakeRequest, local: int = 0) -> int:
    ext = sim.admit(req, local)
    sim.step({req: req.num_tokens - req.num_computed_tokens})
    return ext


def test_saves_map_chunks_to_block_and_offset() -> None:
    sim = Sim(block_size=8)
    a = FakeRequest("a", PROMPT)
    prefill(sim, a)
    (save,) = sim.plans[0].saves
    b0, b1 = sim.blocks["a"]
    assert (save.block_ids, save.offsets, save.first_depth) == ([b0, b0, b1], [0, 4, 0], 0)


def test_hit_ends_inside_a_block_and_loads_right_kv() -> None:
    sim = Sim(block_size=8)
    prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 12  # block 0 whole, block 1 tokens 8..11; token 12 is computed
    plan = sim.step({b: 1})
    (load,) = plan.loads
    b0, b1 = sim.blocks["b"]
    assert (load.block_ids, load.offsets) == ([b0, b0, b1], [0, 4, 0])
    assert not plan.saves
    assert sim.tokens_are_right(b, 0, 13)
    assert not sim.failed and sim.leases() == 0


def test_last_prompt_token_is_loaded_but_never_counted_as_a_hit() -> None:
    sim = Sim(block_size=8)
    prompt = list(range(200, 216))  # 16 tokens = 4 chunks = 2 whole blocks
    prefill(sim, FakeRequest("a", prompt))
    b = FakeRequest("b", prompt)
    assert sim.admit(b) == 15  # chunk 3 holds the last token: loaded whole, its last token computed again
    sim.step({b: 1})
    assert sim.tokens_are_right(b, 0, 16) and not sim.failed


def test_exact_repeat_loads_the_partial_chunk_inside_a_block() -> None:
    sim = Sim(block_size=8)
    prompt = list(range(300, 315))  # 15 tokens: 3 chunks of 4 and a partial chunk of 3 at block 1, offset 4
    prefill(sim, FakeRequest("a", prompt))
    (full, partial) = sim.plans[0].saves
    assert (partial.last_valid, partial.offsets, partial.block_ids) == (3, [4], [sim.blocks["a"][1]])
    b = FakeRequest("b", prompt)
    assert sim.admit(b) == 14
    plan = sim.step({b: 1})
    b0, b1 = sim.blocks["b"]
    assert (plan.loads[0].block_ids, plan.loads[0].offsets) == ([b0, b0, b1, b1], [0, 4, 0, 4])
    assert sim.tokens_are_right(b, 0, 15) and not sim.failed and not plan.saves


def test_hit_after_vllm_local_block_hit_starts_at_the_next_chunk() -> None:
    sim = Sim(block_size=8)
    prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT + [1, 2, 3])  # 16 tokens; vLLM has block 0 (8 tokens)
    assert sim.admit(b, local_hit_tokens=8) == 4  # chunk 2 only; chunk 3 was never saved
    plan = sim.step({b: 4}, run_worker=False)
    (load,) = plan.loads
    assert (load.block_ids, load.offsets) == ([sim.blocks["b"][1]], [0])
    assert [(s.first_depth, s.offsets) for s in plan.saves] == [(3, [4])]


def test_chunked_prefill_saves_chunks_of_a_block_not_yet_full() -> None:
    sim = Sim(block_size=8)
    a = FakeRequest("a", PROMPT)
    sim.admit(a)
    b0, b1 = sim.blocks["a"]
    plan = sim.step({a: 6})  # tokens 0..5: chunk 0 done, block 0 not full
    assert [(s.first_depth, s.block_ids, s.offsets) for s in plan.saves] == [(0, [b0], [0])]
    plan = sim.step({a: 6})  # tokens 6..11: chunks 1 (ends block 0) and 2 (block 1, not full)
    assert [(s.first_depth, s.block_ids, s.offsets) for s in plan.saves] == [(1, [b0, b1], [4, 0])]
    plan = sim.step({a: 1})
    assert not plan.saves
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 12
    sim.step({b: 1})
    assert sim.tokens_are_right(b, 0, 13)


def test_partial_prefix_hit_with_blocks_of_four_chunks() -> None:
    sim = Sim(block_size=16)
    prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT[:9] + [7] * 12)  # shares 2 whole chunks and 1 token
    assert sim.admit(b) == 8
    plan = sim.step({b: b.num_tokens - 8})
    assert (plan.loads[0].block_ids, plan.loads[0].offsets) == ([sim.blocks["b"][0]] * 2, [0, 4])
    (save,) = plan.saves
    assert (save.first_depth, save.offsets) == (2, [8, 12, 0])  # chunks 2, 3 in block 0, chunk 4 in block 1
    assert sim.tokens_are_right(b, 0, b.num_tokens)


def test_load_error_of_one_chunk_fails_its_block_and_is_saved_again() -> None:
    sim = Sim(block_size=8)
    prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 12
    load = sim.sched.reqs["b"].load
    assert load is not None and load.lease_id is not None and sim.client.store.memory is not None
    sim.client.release(load.lease_id)  # as if the lease expired ...
    assert sim.client.store.memory.delete(load.keys[2])  # ... and chunk 2 was evicted before the load
    sim.step({b: 1})
    assert sim.failed == {sim.blocks["b"][1]}  # chunk 2 sits in block 1; block 0 loaded fine
    sim.sched.load_errors(sim.failed)
    assert sim.sched.reqs["b"].stored_upto == 2  # from block 1's first chunk on, saved again once computed


# -- the worker's staged loads -----------------------------------------------------------------
class GatedLoad:
    def __init__(self, dests: list[list[np.ndarray]], failed: tuple[int, ...]) -> None:
        self.dests = dests
        self.failed = failed
        self.gates = [threading.Event() for _ in LAYERS]

    def wait_layer(self, layer: int) -> None:
        assert self.gates[layer].wait(10)
        for i, row in enumerate(self.dests):
            row[layer][:] = 10 * layer + i + 1

    def wait(self) -> LoadResult:
        for layer in range(len(LAYERS)):
            self.wait_layer(layer)
        return LoadResult(len(self.dests) - len(self.failed), self.failed, ("memory",) * len(self.dests))


class GatedClient:
    def __init__(self, failed: tuple[int, ...] = ()) -> None:
        self.loads: list[GatedLoad] = []
        self.failed = failed

    def load_layers(self, keys: list[bytes], dests: list[list[np.ndarray]], lease_id: int | None) -> GatedLoad:
        self.loads.append(GatedLoad(dests, self.failed))
        return self.loads[-1]

    def release(self, lease_id: int) -> None:
        pass


def staged_worker(client: GatedClient) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    worker = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), LAYERS, LAYOUT, 8, BLOCK)  # type: ignore[arg-type]
    kv = {name: torch.zeros(6, LAYOUT.num_kv_heads, 8, 2 * LAYOUT.head_size) for name in LAYERS}
    worker.register(kv, "CPU_ATTN", 6)
    return worker, kv


def test_staged_load_scatters_each_layer_when_it_lands() -> None:
    client = GatedClient()
    worker, kv = staged_worker(client)
    worker.start_step(StepPlan(loads=[LoadSpec("r", [b"a" * 32, b"b" * 32, b"c" * 32], [3, 3, 5], [0, 4, 0], 7)]))
    worker.start_loads()
    (load,) = client.loads
    load.gates[0].set()
    worker.wait_layer(LAYERS[0])
    assert kv[LAYERS[1]].count_nonzero() == 0
    page3 = kv[LAYERS[0]][3].view(torch.uint8).reshape(LAYOUT.num_kv_heads, 2, 8 * LAYOUT.head_size * 4)
    k3 = page3[:, 0].reshape(LAYOUT.num_kv_heads, LAYOUT.head_size, 8, 4)  # K^T [D, N] in bytes
    assert (k3[:, :, :4] == 1).all() and (k3[:, :, 4:] == 2).all()  # chunk 0 at tokens 0..3, chunk 1 at 4..7
    assert (page3[:, 1, :4 * LAYOUT.head_size * 4] == 1).all() and (page3[:, 1, 4 * LAYOUT.head_size * 4:] == 2).all()
    page5 = kv[LAYERS[0]][5].view(torch.uint8).reshape(LAYOUT.num_kv_heads, 2, 8, LAYOUT.head_size * 4)
    assert (page5[:, 1, :4] == 3).all() and (page5[:, 1, 4:] == 0).all()  # V rows 4..7 of block 5 untouched
    load.gates[1].set()
    worker.finish_step()
    assert (kv[LAYERS[1]][5].view(torch.uint8).reshape(LAYOUT.num_kv_heads, 2, 8, -1)[:, 1, :4] == 13).all()
    assert worker.take_failed_blocks() == set()


def test_staged_load_failure_reports_only_the_failed_chunks_block() -> None:
    client = GatedClient(failed=(2,))
    worker, _ = staged_worker(client)
    worker.start_step(StepPlan(loads=[LoadSpec("r", [b"a" * 32, b"b" * 32, b"c" * 32, b"d" * 32],
                                               [3, 3, 5, 5], [0, 4, 0, 4], None)]))
    worker.start_loads()
    for gate in client.loads[0].gates:
        gate.set()
    worker.finish_step()
    assert worker.take_failed_blocks() == {5}
    assert (worker.stats.loaded_chunks, worker.stats.failed_chunks) == (2, 2)


# -- the CPU adapter's strided copies -------------------------------------------------------
def test_cpu_adapter_gathers_chunk_sections_as_pages_of_chunk_sized_blocks() -> None:
    lay = KVLayout(num_layers=1, num_kv_heads=2, head_size=8, dtype="float32")
    kv = torch.zeros(4, 2, 16, 16)
    for off in range(16):
        write_cpu_token(kv[2], off, 100.0 * off)
    adapter = CpuPageAdapter(kv, lay, 4, 16, chunk_tokens=4)
    sections = adapter.gather_chunks([2, 2], [4, 12])
    for i, start in enumerate((4, 12)):
        want = torch.zeros(2, 4, 16)  # the page of a 4-token block holding tokens start..start+3
        for off in range(4):
            write_cpu_token(want, off, 100.0 * (start + off))
        assert np.array_equal(sections[i], want.view(torch.uint8).numpy().reshape(-1))
    dst = torch.zeros(4, 2, 16, 16)
    CpuPageAdapter(dst, lay, 4, 16, chunk_tokens=4).scatter_chunks([1, 3], [4, 12], sections)
    page = torch.zeros(2, 16, 16)
    for off in range(4):
        write_cpu_token(page, 4 + off, 100.0 * (4 + off))
    assert torch.equal(dst[1], page)
    page = torch.zeros(2, 16, 16)
    for off in range(4):
        write_cpu_token(page, 12 + off, 100.0 * (12 + off))
    assert torch.equal(dst[3], page)
    assert dst[0].count_nonzero() == 0 and dst[2].count_nonzero() == 0


def test_cpu_adapter_sections_match_vllm_kernel_pages() -> None:
    """A chunk gathered from a 32-token page the real kernel wrote equals the 8-token page it writes."""
    ops = pytest.importorskip("vllm._custom_ops")
    heads, d = 2, 64
    lay = KVLayout(num_layers=1, num_kv_heads=heads, head_size=d, dtype="float32")
    key, value = torch.randn(32, heads, d), torch.randn(32, heads, d)

    def kernel_pages(block: int, isa: str) -> torch.Tensor:
        kv = torch.zeros(32 // block, heads, block, 2 * d)
        k_cache, v_cache = kv.view(32 // block, heads, 2 * block, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, torch.arange(32), isa)
        return kv

    big, small = kernel_pages(32, "vec"), kernel_pages(8, "vec16")
    sections = CpuPageAdapter(big, lay, 1, 32, chunk_tokens=8).gather_chunks([0] * 4, [0, 8, 16, 24])
    for j in range(4):
        assert np.array_equal(sections[j], small[j].view(torch.uint8).numpy().reshape(-1))


def test_gpu_layouts_refuse_chunks_smaller_than_a_block() -> None:
    lay = KVLayout(num_layers=1, num_kv_heads=2, head_size=8, dtype="float32")
    with pytest.raises(UnsupportedLayoutError, match="whole vLLM blocks"):
        SplitLastAdapter(torch.zeros(4, 2, 16, 16), lay, 4, 16, chunk_tokens=8)
    with pytest.raises(UnsupportedLayoutError, match="does not divide"):
        CpuPageAdapter(torch.zeros(4, 2, 16, 16), lay, 4, 16, chunk_tokens=6)
