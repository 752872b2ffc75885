"""The vLLM worker's direct loads (batched GPU layouts, in-process store), forced on CPU tensors.

On CUDA with a page-locked pool the worker copies a step's hits straight out of the store's DRAM
slots (no host staging copy), checking their checksums on the store's verify threads meanwhile.
`direct_loads=True` runs the same code on the CPU: these tests hold it to bit-exact round trips,
to several loads in one step, and to the faults: a corrupt section, a chunk gone from DRAM, a copy
that fails to queue. Every borrowed chunk is handed back, and a failed chunk's block is zeroed and
reported (vLLM recomputes it), never served.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.client.api import InProcessClient
from kvtier.connectors.copy_engine import pool_runs
from kvtier.connectors.vllm.layouts import SplitLastAdapter, UnsupportedLayoutError
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core import metrics as m
from kvtier.core.config import DiskTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import TieredStore
from tests.connectors.vllm.test_batched import BLOCK, BLOCKS, ORDERS, bits, layout, make_client, random_views, run_step
from tests.connectors.vllm.test_layouts import vllm_views
from tests.service.util import ServiceProcess, cleanup, short_tmpdir

NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(3)]


def worker(client: object, kv: dict[str, torch.Tensor], lay: KVLayout, backend: str = "FLASH_ATTN",
           direct: bool | None = True, blocks: int = BLOCKS) -> WorkerSide:
    w = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), tuple(kv), lay, BLOCK,  # type: ignore[arg-type,return-value]
                   direct_loads=direct)
    w.register(kv, backend, blocks)
    return w


def refs(client: InProcessClient) -> set[int]:
    return {e.refs for e in client.store.memory._index.values()}  # noqa: SLF001 - the test checks the pins


def empty_views(lay: KVLayout, order: str = "LBNHC", fill: float = 0.0) -> dict[str, torch.Tensor]:
    views = vllm_views(lay.num_layers, BLOCKS, lay.num_kv_heads, BLOCK, 2 * lay.head_size, getattr(torch, lay.dtype),
                       ORDERS[order])
    for v in views:
        v.fill_(fill)
    return dict(zip(NAMES[:lay.num_layers], views, strict=True))


def saved(client: InProcessClient, lay: KVLayout, order: str = "LBNHC", seed: int = 5, chunks: int = BLOCKS,
          ) -> tuple[dict[str, torch.Tensor], list[bytes], list[int]]:
    """Save `chunks` chunks of random KV from shuffled blocks; (source views, keys, block of chunk i)."""
    src = dict(zip(NAMES[:lay.num_layers], random_views(lay, ORDERS[order], seed=seed), strict=True))
    root = client.namespace(f"direct-{seed}").root()
    keys = client.chunk_keys(root, list(range(chunks * BLOCK)))
    blocks = np.random.default_rng(seed).permutation(BLOCKS)[:chunks].tolist()
    run_step(worker(client, src, lay, direct=None), StepPlan(saves=[SaveSpec("s", keys, blocks, [0] * chunks, root, 0)]))
    assert client.lookup(keys).hits == chunks
    return src, keys, blocks


def same_kv(dst: torch.Tensor, dst_blocks: list[int], src: torch.Tensor, src_blocks: list[int]) -> bool:
    return torch.equal(bits(dst.index_select(0, torch.tensor(dst_blocks))), bits(src.index_select(0, torch.tensor(src_blocks))))


def test_pool_runs_merge_only_rows_whose_slots_neighbour() -> None:
    assert pool_runs([], 8) == []
    assert pool_runs([(0, 80), (1, 88), (2, 96), (3, 8), (5, 16)], 8) == [[0, 80, 3], [3, 8, 1], [5, 16, 1]]
    # a group of layers narrower than a slot: neighbouring slots are not neighbouring pieces
    assert pool_runs([(0, 4), (1, 36)], 8) == [[0, 4, 1], [1, 36, 1]]


@pytest.mark.parametrize("order", ["LBNHC", "BLHNC", "BHLNC"])
@pytest.mark.parametrize(("group_bytes", "device_bytes"), [(None, None), (1, 1 << 20), (1 << 40, 40_000)])
def test_direct_round_trip_of_2048_blocks_is_bit_exact(order: str, group_bytes: int | None, device_bytes: int | None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole chunks in one batch (the default here), a group per layer in big batches, and whole
    chunks in batches of a few rows: every combination places the same bytes."""
    if group_bytes is not None:
        monkeypatch.setattr("kvtier.connectors.vllm.worker.DIRECT_GROUP_BYTES", group_bytes)
    if device_bytes is not None:
        monkeypatch.setattr("kvtier.connectors.vllm.worker.DIRECT_DEVICE_BYTES", device_bytes)
    lay = layout("bfloat16", layers=3)
    client = make_client(lay)
    try:
        src, keys, blocks = saved(client, lay, order)
        dst = empty_views(lay, order)
        loader = worker(client, dst, lay)
        run_step(loader, StepPlan(loads=[LoadSpec("l", keys, list(range(BLOCKS)), [0] * BLOCKS, None)]))
        assert loader.take_failed_blocks() == set()
        assert loader.stats.direct_chunks == loader.stats.loaded_chunks == BLOCKS
        assert loader.stats.tiers == {"memory": BLOCKS}
        for name in dst:
            assert same_kv(dst[name], list(range(BLOCKS)), src[name], blocks)
        assert refs(client) == {0}  # every borrowed chunk handed back
    finally:
        client.close()


def test_several_loads_in_one_step_with_a_lease() -> None:
    lay = layout("float32", layers=2)
    client = make_client(lay)
    try:
        src, keys, blocks = saved(client, lay, chunks=40)
        lease = client.lookup(keys[:10], lease=True)
        assert lease.hits == 10 and lease.lease_id is not None
        dst = empty_views(lay)
        loader = worker(client, dst, lay, backend="TRITON_ATTN")
        run_step(loader, StepPlan(loads=[LoadSpec("a", keys[:10], list(range(100, 110)), [0] * 10, lease.lease_id),
                                         LoadSpec("b", keys[25:40], list(range(7, 22)), [0] * 15, None)]))
        assert loader.take_failed_blocks() == set() and loader.stats.direct_chunks == 25
        for name in dst:
            assert same_kv(dst[name], list(range(100, 110)), src[name], blocks[:10])
            assert same_kv(dst[name], list(range(7, 22)), src[name], blocks[25:40])
            untouched = [b for b in range(BLOCKS) if not (100 <= b < 110 or 7 <= b < 22)]
            assert dst[name][untouched].count_nonzero() == 0
        assert refs(client) == {0}
        assert client.stats()["host"]["leases"] == 0  # the lease was released at the step's end
    finally:
        client.close()


def test_corrupt_section_fails_its_chunk_only_and_is_dropped() -> None:
    lay = layout("float32", layers=3)
    client = make_client(lay)
    try:
        src, keys, blocks = saved(client, lay, chunks=12)
        mem = client.store.memory
        mem.layer_view(mem.slot_of(keys[4]), 2)[9] ^= 0xFF  # one byte of chunk 4, layer 2
        dst = empty_views(lay, fill=3.0)
        loader = worker(client, dst, lay)
        run_step(loader, StepPlan(loads=[LoadSpec("l", keys, list(range(12)), [0] * 12, None)]))
        assert loader.take_failed_blocks() == {4}
        assert loader.stats.failed_chunks == 1 and loader.stats.loaded_chunks == 11
        good = [i for i in range(12) if i != 4]
        for name in dst:
            assert same_kv(dst[name], good, src[name], [blocks[i] for i in good])
            assert dst[name][4].count_nonzero() == 0  # zeroed, never the corrupt bytes
        assert client.store.metrics.get(m.CHECKSUM_FAILURES, tier="memory") == 1
        assert client.lookup(keys).hits == 4  # the corrupt copy is unindexed
        assert refs(client) == {0}
        assert len(mem._free) + len(mem._index) == mem.num_slots  # noqa: SLF001 - its slot was freed, none leaked
    finally:
        client.close()


def test_chunk_gone_from_dram_is_reported_and_zeroed() -> None:
    lay = layout("float32", layers=2)
    client = make_client(lay)
    try:
        src, keys, blocks = saved(client, lay, chunks=6)
        assert client.store.memory.delete(keys[5])
        dst = empty_views(lay, fill=-1.0)
        loader = worker(client, dst, lay)
        run_step(loader, StepPlan(loads=[LoadSpec("l", keys, [10, 11, 12, 13, 14, 15], [0] * 6, None)]))
        assert loader.take_failed_blocks() == {15}
        for name in dst:
            assert same_kv(dst[name], [10, 11, 12, 13, 14], src[name], blocks[:5])
            assert dst[name][15].count_nonzero() == 0
        assert refs(client) == {0}
    finally:
        client.close()


def test_a_copy_that_fails_to_queue_fails_the_step_and_releases_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    lay = layout("float32", layers=2)
    client = make_client(lay)
    try:
        _, keys, _ = saved(client, lay, chunks=8)
        dst = empty_views(lay, fill=2.0)
        loader = worker(client, dst, lay)

        def broken(self: SplitLastAdapter, blocks: list[int], sections: torch.Tensor) -> None:
            self.kv[blocks[0]].fill_(9.0)  # half-written before the error
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(SplitLastAdapter, "scatter_device", broken)
        run_step(loader, StepPlan(loads=[LoadSpec("l", keys, list(range(20, 28)), [0] * 8, None)]))
        assert loader.take_failed_blocks() == set(range(20, 28))
        assert loader.stats.failed_chunks == 8 and loader.stats.direct_chunks == 0
        for name in dst:
            assert dst[name][20:28].count_nonzero() == 0
        assert refs(client) == {0}
    finally:
        client.close()


def test_direct_loads_off_by_default_on_the_cpu_and_refused_where_it_cannot_run(tmp_path: Path) -> None:
    lay = layout("float32", layers=2)
    client = make_client(lay)
    try:
        _, keys, _ = saved(client, lay, chunks=4)
        auto = worker(client, empty_views(lay), lay, direct=None)
        run_step(auto, StepPlan(loads=[LoadSpec("l", keys, [0, 1, 2, 3], [0] * 4, None)]))
        assert auto.stats.loaded_chunks == 4 and auto.stats.direct_chunks == 0  # staged: the pool is not page-locked
        cpu_views = dict(zip(NAMES[:2], vllm_views(2, BLOCKS, lay.num_kv_heads, BLOCK, 2 * lay.head_size,
                                                   torch.float32, ORDERS["LBHNC"]), strict=True))
        with pytest.raises(UnsupportedLayoutError, match="direct_loads=True needs a batched GPU layout"):
            worker(client, cpu_views, lay, backend="CPU_ATTN")

    finally:
        client.close()
    disk_only = InProcessClient(TieredStore(StoreConfig(chunk_tokens=BLOCK, hash_mode="sha256", memory=None, disk=DiskTierConfig(
        root=str(tmp_path), capacity_bytes=1 << 24)), lay))
    try:
        with pytest.raises(ValueError, match="lends none: no DRAM tier"):
            worker(disk_only, empty_views(lay), lay)
    finally:
        disk_only.close()


def test_direct_loads_through_a_kvtier_serve_client(tmp_path: Path) -> None:
    """The worker of a real vLLM deployment talks to `kvtier serve`: its direct loads read the
    service's shared-memory pool in place between load_begin and load_end, and a corrupt section is
    reported to the service (which drops the chunk), never served."""
    lay = layout("float32", layers=2)
    folder = short_tmpdir()
    cfg = {"layout": {"num_layers": lay.num_layers, "num_kv_heads": lay.num_kv_heads, "head_size": lay.head_size,
                      "dtype": lay.dtype},
           "store": {"chunk_tokens": BLOCK, "hash_mode": "sha256",
                     "memory": {"capacity_bytes": 64 * lay.chunk_bytes(BLOCK)}},
           "socket_path": os.path.join(folder, "kv.sock"), "message_timeout_s": 1.0}
    try:
        with ServiceProcess(cfg, folder) as service:
            client = service.client()
            try:
                src, keys, blocks = saved(client, lay, chunks=20)  # type: ignore[arg-type]
                region = client.lendable_pool()
                assert region is not None
                session_pool = np.frombuffer((ctypes.c_uint8 * region.nbytes).from_address(region.address), np.uint8)
                lease = client.lookup(keys, lease=True)
                dst = empty_views(lay, fill=5.0)
                loader = worker(client, dst, lay)
                run_step(loader, StepPlan(loads=[LoadSpec("l", keys, list(range(30, 50)), [0] * 20, lease.lease_id)]))
                assert loader.take_failed_blocks() == set() and loader.stats.direct_chunks == 20
                for name in dst:
                    assert same_kv(dst[name], list(range(30, 50)), src[name], blocks)
                # corrupt chunk 7 in the shared pool: found by its checksum, dropped by the service
                borrow = client.borrow(keys[7:8])
                assert borrow is not None and borrow.slots[0] >= 0
                slot = borrow.slots[0]
                assert borrow.end()
                session_pool[slot * lay.chunk_bytes(BLOCK) + 3] ^= 0xFF
                run_step(loader, StepPlan(loads=[LoadSpec("l2", keys, list(range(30, 50)), [0] * 20, None)]))
                assert loader.take_failed_blocks() == {37}
                for name in dst:
                    assert dst[name][37].count_nonzero() == 0
                    assert same_kv(dst[name], list(range(30, 37)), src[name], blocks[:7])
                assert client.lookup(keys).hits == 7  # the service unindexed the corrupt chunk
                host = client.stats()["host"]
                assert host["loads"] == 0 and host["leases"] == 0  # every pin went back
            finally:
                client.close()
    finally:
        cleanup(folder)
