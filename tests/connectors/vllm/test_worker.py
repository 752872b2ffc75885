"""The worker side's layer-wise loads: wait_layer(i) waits for layer i only (no engine)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, StepPlan
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.store.tiered import LoadResult
from tests.connectors.vllm.sim import BLOCK, LAYERS, LAYOUT

NUM_BLOCKS = 8


class GatedLoad:
    """Layer j lands only once the test opens gate j."""

    def __init__(self, dests: list[list[np.ndarray]]) -> None:
        self.dests = dests
        self.gates = [threading.Event() for _ in LAYERS]

    def wait_layer(self, layer: int) -> None:
        assert self.gates[layer].wait(10)
        for row in self.dests:
            row[layer][:] = layer + 1

    def wait(self) -> LoadResult:
        return LoadResult(len(self.dests), (), ("memory",) * len(self.dests))


class GatedClient:
    def __init__(self) -> None:
        self.loads: list[GatedLoad] = []
        self.released: list[int] = []

    def load_layers(self, keys: list[bytes], dests: list[list[np.ndarray]], lease_id: int | None) -> GatedLoad:
        self.loads.append(GatedLoad(dests))
        return self.loads[-1]

    def release(self, lease_id: int) -> None:
        self.released.append(lease_id)


def make_worker(client: GatedClient) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    worker = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), LAYERS, LAYOUT, BLOCK)  # type: ignore[arg-type]
    kv = {name: torch.zeros(NUM_BLOCKS, LAYOUT.num_kv_heads, BLOCK, 2 * LAYOUT.head_size) for name in LAYERS}
    worker.register(kv, "CPU_ATTN", NUM_BLOCKS)
    return worker, kv


def test_wait_layer_returns_when_its_layer_landed_while_later_layers_still_load() -> None:
    client = GatedClient()
    worker, kv = make_worker(client)
    worker.start_step(StepPlan(loads=[LoadSpec("r", [b"a" * 32, b"b" * 32], [3, 5], [0, 0], 7)]))
    worker.start_loads()
    (load,) = client.loads
    load.gates[0].set()
    worker.wait_layer(LAYERS[0])
    assert (kv[LAYERS[0]][[3, 5]].view(torch.uint8) == 1).all()
    second = threading.Thread(target=worker.wait_layer, args=(LAYERS[1],))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # layer 1 is not in place yet
    assert (kv[LAYERS[1]] == 0).all()
    load.gates[1].set()
    second.join(10)
    assert not second.is_alive()
    assert (kv[LAYERS[1]][[3, 5]].view(torch.uint8) == 2).all()
    worker.finish_step()
    assert worker.take_failed_blocks() == set() and client.released == [7]
    assert worker.stats.loaded_chunks == 2


def test_cpu_pages_are_rows_of_the_kv_tensor() -> None:
    worker, kv = make_worker(GatedClient())
    adapter = worker.adapters[LAYERS[1]]
    targets, finishers = adapter.load_targets([2, 6])
    assert finishers == [None, None]
    targets[1][:] = 9
    assert (kv[LAYERS[1]][6].view(torch.uint8) == 9).all() and (kv[LAYERS[1]][2] == 0).all()
    assert np.shares_memory(adapter.save_source(6), targets[1])
