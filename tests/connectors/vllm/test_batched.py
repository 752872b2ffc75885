"""The GPU layouts' batched path (FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION), on CPU tensors.

One index_select / index_copy_ per layer replaces a staging copy per block; these tests hold it
to the per-block reference and to bit-exact save -> load round trips of 2048 blocks under every
KVCacheLayout order vLLM 0.32 builds, through the adapter alone and through the worker and a
real in-process store. On the CPU the streams and events are the synchronous stand-ins of
copy_engine.SideStream; the CUDA run is scripts/gpu_check.sh.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from kvtier.client.api import InProcessClient
from kvtier.connectors.copy_engine import SaveCopies, SideStream
from kvtier.connectors.vllm.layouts import ADAPTERS, SplitLastAdapter
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import LoadResult, TieredStore
from tests.connectors.vllm.test_layouts import vllm_views

# vLLM 0.32's KVCacheLayout orders: the logical [L, B, H, N, C] axes in physical order, outermost first
ORDERS = {
    "LBNHC": (0, 1, 3, 2, 4),  # the default (FlashAttention's NHD)
    "LBHNC": (0, 1, 2, 3, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
GPU_BACKENDS = [name for name, cls in ADAPTERS.items() if cls is SplitLastAdapter]
BLOCKS = 2048
BLOCK = 16


def layout(dtype: str, layers: int = 2) -> KVLayout:
    return KVLayout(num_layers=layers, num_kv_heads=2, head_size=8, dtype=dtype)


def random_views(lay: KVLayout, order: tuple[int, ...], seed: int, kernel_split: int = 1) -> list[torch.Tensor]:
    dtype = getattr(torch, lay.dtype)
    views = vllm_views(lay.num_layers, BLOCKS * kernel_split, lay.num_kv_heads, BLOCK // kernel_split,
                       2 * lay.head_size, dtype, order)
    g = torch.Generator().manual_seed(seed)
    for kv in views:
        kv.copy_(torch.randn(kv.shape, generator=g).to(dtype))
    return views


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (bit-exact comparison, NaN payloads and -0.0 included)."""
    return t.contiguous().view(torch.uint8)


def test_gpu_backends_have_the_batched_adapter() -> None:
    assert set(GPU_BACKENDS) == {"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"}
    assert SplitLastAdapter.batched and not ADAPTERS["CPU_ATTN"].batched


@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_batched_gather_matches_per_block_sections_and_round_trips(order: str, dtype: str) -> None:
    lay = layout(dtype)
    src = random_views(lay, ORDERS[order], seed=1)
    dst = vllm_views(lay.num_layers, BLOCKS, lay.num_kv_heads, BLOCK, 2 * lay.head_size, getattr(torch, dtype),
                     ORDERS[order])
    perm = np.random.default_rng(2).permutation(BLOCKS).tolist()  # blocks saved in a shuffled order
    for layer in range(lay.num_layers):
        a = SplitLastAdapter(src[layer], lay, BLOCKS, BLOCK)
        sections = a.gather_device(perm)
        assert sections.dtype == torch.uint8 and tuple(sections.shape) == (BLOCKS, lay.layer_bytes(BLOCK))
        for i in (0, 1, 777, BLOCKS - 1):  # the per-block reference (a staging copy each)
            assert np.array_equal(sections[i].numpy(), a.save_source(perm[i]))
        SplitLastAdapter(dst[layer], lay, BLOCKS, BLOCK).scatter_device(perm, sections)
        assert torch.equal(bits(dst[layer]), bits(src[layer]))


def test_batched_moves_kernel_blocks_smaller_than_vllm_blocks() -> None:
    lay = layout("float32")
    src = random_views(lay, ORDERS["LBNHC"], seed=3, kernel_split=2)[0]  # 2 kernel blocks per vLLM block
    a = SplitLastAdapter(src, lay, BLOCKS, BLOCK)
    blocks = [5, 0, 2047, 9]
    sections = a.gather_device(blocks)
    for i, b in enumerate(blocks):
        assert np.array_equal(sections[i].numpy(), a.save_source(b))
    dst = torch.zeros_like(src)
    SplitLastAdapter(dst, lay, BLOCKS, BLOCK).scatter_device([1, 2, 3, 4], sections)
    for j, b in enumerate(blocks):
        assert torch.equal(dst[2 * (j + 1):2 * (j + 2)], src[2 * b:2 * b + 2])
    assert dst[:2].count_nonzero() == 0 and dst[10:].count_nonzero() == 0


def test_batched_gather_zeroes_the_rest_of_a_partial_last_chunk() -> None:
    lay = layout("float32")
    src = random_views(lay, ORDERS["LBNHC"], seed=4)[0]
    a = SplitLastAdapter(src, lay, BLOCKS, BLOCK)
    full, cut = a.gather_device([3, 8]), a.gather_device([3, 8], last_valid=5)
    assert torch.equal(full[0], cut[0])
    want = torch.from_numpy(a.save_source(8).copy())
    a.clear_tokens(want.numpy(), 5)  # the per-block reference of a partial chunk
    assert torch.equal(cut[1], want) and not torch.equal(cut[1], full[1])


def test_batched_refuses_bad_blocks_and_sections() -> None:
    lay = layout("float32")
    a = SplitLastAdapter(vllm_views(2, 8, 2, BLOCK, 16, torch.float32, ORDERS["LBNHC"])[0], lay, 8, BLOCK)
    with pytest.raises(ValueError, match="block ids"):
        a.gather_device([8])
    with pytest.raises(ValueError, match="sections must be uint8"):
        a.scatter_device([1], torch.zeros(1, 3, dtype=torch.uint8))


def make_client(lay: KVLayout) -> InProcessClient:
    cfg = StoreConfig(chunk_tokens=BLOCK, hash_mode="sha256",
                      memory=MemoryTierConfig(capacity_bytes=(BLOCKS + 8) * lay.chunk_bytes(BLOCK)))
    return InProcessClient(TieredStore(cfg, lay))


def worker_for(client: InProcessClient, backend: str, kv: dict[str, torch.Tensor], lay: KVLayout) -> WorkerSide:
    worker = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), tuple(kv), lay, BLOCK)
    worker.register(kv, backend, BLOCKS)
    return worker


def run_step(worker: WorkerSide, plan: StepPlan) -> None:
    """vLLM's order of connector calls in one forward."""
    worker.start_step(plan)
    worker.start_loads()
    for name in worker.layer_names:
        worker.wait_layer(name)
        worker.save_layer(name)
    worker.finish_step()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("order", ["LBNHC", "BLHNC", "BHLNC"])
def test_worker_round_trip_of_2048_blocks_through_the_store_is_bit_exact(backend: str, order: str) -> None:
    lay = layout("bfloat16", layers=3)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(lay.num_layers)]
    src = dict(zip(names, random_views(lay, ORDERS[order], seed=5), strict=True))
    client = make_client(lay)
    try:
        root = client.namespace("batched-test").root()
        keys = client.chunk_keys(root, list(range(BLOCKS * BLOCK)))
        saved_blocks = np.random.default_rng(6).permutation(BLOCKS).tolist()  # chunk i sits in block saved_blocks[i]
        saver = worker_for(client, backend, src, lay)
        assert saver.batched
        run_step(saver, StepPlan(saves=[SaveSpec("r1", keys, saved_blocks, [0] * BLOCKS, root, 0)]))
        assert saver.stats.saved_chunks == BLOCKS
        assert client.lookup(keys).hits == BLOCKS

        dst = dict(zip(names, vllm_views(lay.num_layers, BLOCKS, lay.num_kv_heads, BLOCK, 2 * lay.head_size,
                                         torch.bfloat16, ORDERS[order]), strict=True))
        loaded_blocks = list(range(BLOCKS))  # chunk i into block i
        loader = worker_for(client, backend, dst, lay)
        run_step(loader, StepPlan(loads=[LoadSpec("r2", keys, loaded_blocks, [0] * BLOCKS, None)]))
        assert loader.take_failed_blocks() == set()
        assert loader.stats.loaded_chunks == BLOCKS
        index = torch.tensor(saved_blocks)
        for name in names:
            assert torch.equal(bits(dst[name]), bits(src[name].index_select(0, index)))
    finally:
        client.close()


class GatedLoad:
    """A layered load whose layer j lands (a constant byte in every section) when gate j opens."""

    def __init__(self, dests: list[list[np.ndarray]], layers: int) -> None:
        self.dests = dests
        self.gates = [threading.Event() for _ in range(layers)]
        self.landed = [False] * layers

    def _land(self, layer: int) -> None:
        if not self.landed[layer]:
            for row in self.dests:
                row[layer][:] = layer + 1
            self.landed[layer] = True

    def layer_ready(self, layer: int) -> bool:
        if self.gates[layer].is_set():
            self._land(layer)
        return self.landed[layer]

    def wait_layer(self, layer: int) -> None:
        assert self.gates[layer].wait(10)
        self._land(layer)

    def wait(self) -> LoadResult:
        for j in range(len(self.gates)):
            self.wait_layer(j)
        return LoadResult(len(self.dests), (), ("memory",) * len(self.dests))


class GatedClient:
    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.loads: list[GatedLoad] = []

    def load_layers(self, keys: list[bytes], dests: list[list[np.ndarray]], lease_id: int | None) -> GatedLoad:
        self.loads.append(GatedLoad(dests, self.layers))
        return self.loads[-1]


def test_wait_layer_places_its_layer_and_queues_the_later_layers_already_staged() -> None:
    lay = layout("float32", layers=4)
    names = [f"l{i}" for i in range(lay.num_layers)]
    client = GatedClient(lay.num_layers)
    dst = dict(zip(names, vllm_views(lay.num_layers, 8, lay.num_kv_heads, BLOCK, 2 * lay.head_size, torch.float32,
                                     ORDERS["LBNHC"]), strict=True))
    worker = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), tuple(names), lay, BLOCK)  # type: ignore[arg-type]
    worker.register(dst, "FLASH_ATTN", 8)
    worker.start_step(StepPlan(loads=[LoadSpec("r", [b"a" * 32, b"b" * 32], [5, 2], [0, 0], None)]))
    worker.start_loads()
    (load,) = client.loads
    load.gates[0].set()
    load.gates[2].set()  # staged out of order: layer 2 waits for layer 1 (layers are placed in order)

    def placed(name: str, value: int) -> bool:
        return bool((dst[name][[5, 2]].view(torch.uint8) == value).all()) and dst[name][[0, 1, 3, 4, 6, 7]].count_nonzero() == 0

    worker.wait_layer("l0")
    assert placed("l0", 1) and placed("l1", 0) and placed("l2", 0)
    load.gates[1].set()
    worker.wait_layer("l1")
    assert placed("l1", 2) and placed("l2", 3) and placed("l3", 0)  # l2 queued early: it was staged
    load.gates[3].set()
    worker.finish_step()
    assert placed("l3", 4) and worker.take_failed_blocks() == set()


def test_worker_failed_chunk_is_zeroed_and_reported() -> None:
    lay = layout("float32")
    names = ["l0", "l1"]
    src = dict(zip(names, random_views(lay, ORDERS["LBNHC"], seed=8), strict=True))
    client = make_client(lay)
    try:
        root = client.namespace("batched-test").root()
        keys = client.chunk_keys(root, list(range(3 * BLOCK)))
        run_step(worker_for(client, "TRITON_ATTN", src, lay),
                 StepPlan(saves=[SaveSpec("r1", keys[:2], [4, 5], [0, 0], root, 0)]))  # the third never saved
        dst = {n: torch.full_like(t, 7.0) for n, t in src.items()}
        loader = worker_for(client, "TRITON_ATTN", dst, lay)
        run_step(loader, StepPlan(loads=[LoadSpec("r2", keys, [1, 2, 3], [0] * 3, None)]))
        assert loader.take_failed_blocks() == {3}
        for n in names:
            assert torch.equal(dst[n][1:3], src[n][4:6]) and dst[n][3].count_nonzero() == 0
    finally:
        client.close()


def test_partial_last_chunk_is_saved_with_zeros_after_its_tokens() -> None:
    lay = layout("float32")
    names = ["l0", "l1"]
    src = dict(zip(names, random_views(lay, ORDERS["LBNHC"], seed=9), strict=True))
    client = make_client(lay)
    try:
        root = client.namespace("batched-test").root()
        keys = client.chunk_keys(root, list(range(2 * BLOCK)))
        run_step(worker_for(client, "FLEX_ATTENTION", src, lay),
                 StepPlan(saves=[SaveSpec("r1", keys, [6, 7], [0, 0], root, 0, last_valid=3)]))
        dst = {n: torch.zeros_like(t) for n, t in src.items()}
        run_step(worker_for(client, "FLEX_ATTENTION", dst, lay),
                 StepPlan(loads=[LoadSpec("r2", keys, [0, 1], [0, 0], None)]))
        for n in names:
            assert torch.equal(dst[n][0], src[n][6])
            assert torch.equal(dst[n][1][:, :3], src[n][7][:, :3]) and dst[n][1][:, 3:].count_nonzero() == 0
    finally:
        client.close()


class GateEvent:
    """A copy's event that completes when the test says so (or fails like a CUDA error)."""

    def __init__(self, gate: threading.Event, error: str | None = None) -> None:
        self.gate, self.error = gate, error

    def synchronize(self) -> None:
        assert self.gate.wait(10)
        if self.error:
            raise RuntimeError(self.error)


class GatedStream(SideStream):
    """The CPU SideStream, except that its events complete only when the gate opens."""

    def __init__(self, gate: threading.Event, error: str | None = None) -> None:
        super().__init__("cpu")
        self.gate, self.error = gate, error

    def run(self, fn: Any, after_compute: bool = False) -> tuple[Any, Any]:
        return fn(), GateEvent(self.gate, self.error)


def threaded_saver(client: InProcessClient, src: dict[str, torch.Tensor], lay: KVLayout, gate: threading.Event,
                   error: str | None = None) -> WorkerSide:
    """A worker whose saves run as on CUDA: writes and commit on the copy thread, after the copy event."""
    saver = worker_for(client, "FLASH_ATTN", src, lay)
    saver._save_stream = GatedStream(gate, error)
    saver._save_copies = SaveCopies("cpu", threaded=True)
    return saver


def test_chunks_are_published_only_once_their_copies_complete_and_the_forward_does_not_wait() -> None:
    lay = layout("float32")
    src = dict(zip(["l0", "l1"], random_views(lay, ORDERS["LBNHC"], seed=10), strict=True))
    client = make_client(lay)
    try:
        root = client.namespace("batched-test").root()
        keys = client.chunk_keys(root, list(range(3 * BLOCK)))
        gate = threading.Event()
        saver = threaded_saver(client, src, lay, gate)
        run_step(saver, StepPlan(saves=[SaveSpec("r1", keys, [7, 8, 9], [0] * 3, root, 0)]))  # returns at once
        assert client.lookup(keys).hits == 0  # copies not complete: nothing published
        gate.set()
        saver._save_copies.drain()
        assert client.lookup(keys).hits == 3 and saver.stats.saved_chunks == 3
        dst = {n: torch.zeros_like(t) for n, t in src.items()}
        run_step(worker_for(client, "FLASH_ATTN", dst, lay), StepPlan(loads=[LoadSpec("r2", keys, [0, 1, 2], [0] * 3, None)]))
        for n in src:
            assert torch.equal(dst[n][:3], src[n][7:10])
    finally:
        client.close()


def test_a_failed_save_copy_publishes_nothing_and_frees_its_slots() -> None:
    lay = layout("float32")
    src = dict(zip(["l0", "l1"], random_views(lay, ORDERS["LBNHC"], seed=11), strict=True))
    client = make_client(lay)
    try:
        root = client.namespace("batched-test").root()
        keys = client.chunk_keys(root, list(range(2 * BLOCK)))
        gate = threading.Event()
        gate.set()
        saver = threaded_saver(client, src, lay, gate, error="CUDA error: an illegal memory access")
        run_step(saver, StepPlan(saves=[SaveSpec("r1", keys, [1, 2], [0, 0], root, 0)]))
        saver._save_copies.drain()
        assert client.lookup(keys).hits == 0 and saver.stats.saved_chunks == 0
        counts = client.store.memory.slot_counts()
        assert counts["reserved"] == 0 and counts["resident"] == 0
    finally:
        client.close()
