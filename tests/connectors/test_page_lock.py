"""copy_engine's page-locking of the store's DRAM pool: the registry's bookkeeping with stand-in
register/unregister calls, and the CUDA path skipped cleanly without a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from kvtier.client import connect
from kvtier.connectors import copy_engine
from kvtier.connectors.copy_engine import HostRegistry, page_lock_pool
from kvtier.tiers.pool import PoolRegion
from tests.conftest import CHUNK, TINY


class FakeCuda:
    """Stand-in for cudaHostRegister / cudaHostUnregister: records calls, refuses what it is told to."""

    def __init__(self, refuse: str | None = None) -> None:
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.refuse = refuse

    def register(self, address: int, nbytes: int) -> str | None:
        self.calls.append(("register", address))
        if self.refuse:
            return self.refuse
        self.registered[address] = nbytes
        return None

    def unregister(self, address: int) -> str | None:
        self.calls.append(("unregister", address))
        return None if self.registered.pop(address, None) is not None else "cudaErrorHostMemoryNotRegistered"


def registry(cuda: FakeCuda) -> HostRegistry:
    return HostRegistry(cuda.register, cuda.unregister)


def test_a_range_is_registered_once_and_unregistered_with_its_last_owner() -> None:
    cuda = FakeCuda()
    reg = registry(cuda)
    assert reg.acquire(1 << 20, 8192) and reg.acquire(1 << 20, 8192)
    assert cuda.calls == [("register", 1 << 20)] and reg.registered() == {(1 << 20, 8192): 2}
    reg.release(1 << 20, 8192)
    assert cuda.registered == {1 << 20: 8192}  # one owner left
    reg.release(1 << 20, 8192)
    assert cuda.calls == [("register", 1 << 20), ("unregister", 1 << 20)] and reg.registered() == {}
    reg.release(1 << 20, 8192)  # released again (an owner closing twice): nothing more happens
    assert len(cuda.calls) == 2


def test_disjoint_ranges_are_registered_each_and_an_overlap_stays_pageable(caplog) -> None:
    cuda = FakeCuda()
    reg = registry(cuda)
    assert reg.acquire(0x10000, 0x4000) and reg.acquire(0x14000, 0x1000)  # adjacent, not overlapping
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.copy_engine"):
        copy_engine._warned.discard("overlap")
        assert not reg.acquire(0x13000, 0x2000)  # straddles both
    assert "overlaps" in caplog.text
    assert [a for op, a in cuda.calls] == [0x10000, 0x14000]  # CUDA never asked for the overlap
    reg.release(0x13000, 0x2000)  # never registered: ignored
    assert set(reg.registered()) == {(0x10000, 0x4000), (0x14000, 0x1000)}


def test_a_refused_registration_is_a_logged_fallback_not_an_error(caplog) -> None:
    cuda = FakeCuda(refuse="cudaErrorMemoryAllocation")
    reg = registry(cuda)
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.copy_engine"):
        copy_engine._warned.discard("register")
        assert not reg.acquire(1 << 20, 4096)
    assert "refused (cudaErrorMemoryAllocation)" in caplog.text and "ulimit -l" in caplog.text
    assert reg.registered() == {}
    reg.release(1 << 20, 4096)  # its owner closes: nothing to unregister
    assert cuda.calls == [("register", 1 << 20)]


@pytest.mark.parametrize("address, nbytes", [(0, 4096), (4096, 0), (-4096, 4096)])
def test_an_empty_or_negative_range_is_refused(address: int, nbytes: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        registry(FakeCuda()).acquire(address, nbytes)


def test_the_registry_follows_a_store_from_open_to_close() -> None:
    cuda = FakeCuda()
    reg = registry(cuda)
    client = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK,
                                                     "memory": {"capacity_bytes": 4 * TINY.chunk_bytes(CHUNK)}}},
                     layout=TINY)
    region = client.store.memory.pool_region()
    client.watch_pool(reg)
    assert cuda.registered == {region.address: region.nbytes}
    client.close()
    assert cuda.registered == {} and reg.registered() == {}


class Owner:
    def __init__(self) -> None:
        self.watchers: list[object] = []

    def watch_pool(self, watcher: object) -> None:
        self.watchers.append(watcher)


def test_page_locking_is_skipped_for_a_cpu_cache() -> None:
    owner, reg = Owner(), registry(FakeCuda())
    assert not page_lock_pool(owner, "cpu", reg)
    assert owner.watchers == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")
def test_page_locking_is_skipped_cleanly_without_a_gpu() -> None:
    """A cache said to be on CUDA where torch has no CUDA: nothing registered, no CUDA call made."""
    owner = Owner()
    assert not page_lock_pool(owner, "cuda", registry(FakeCuda()))
    assert not page_lock_pool(owner, "cuda:0")  # the process registry: not even created for this
    assert owner.watchers == []


def test_page_locking_watches_the_owner_when_cuda_is_present(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    owner, reg = Owner(), registry(FakeCuda())
    assert page_lock_pool(owner, "cuda", reg)
    assert owner.watchers == [reg]
    assert not page_lock_pool(object(), "cuda", reg)  # nothing to watch: skipped


def test_the_vllm_worker_does_not_page_lock_for_a_cpu_cache() -> None:
    from kvtier.connectors.vllm.link import StoreLink
    from kvtier.connectors.vllm.worker import WorkerSide

    class Client:
        def watch_pool(self, watcher: object) -> None:
            raise AssertionError("page-locking asked for a CPU cache")

    worker = WorkerSide(StoreLink(lambda first: Client(), retry_after_s=0.0), ("l0",), TINY, CHUNK)  # type: ignore[arg-type,return-value]
    kv = torch.zeros(4, TINY.num_kv_heads, CHUNK, 2 * TINY.head_size, dtype=getattr(torch, TINY.dtype))
    worker.register({"l0": kv}, "FLASH_ATTN", 4)
    assert worker.batched and worker._pool_watched is None


def test_pool_region_is_what_the_registry_is_told() -> None:
    seen: list[tuple[int, int]] = []
    cuda = FakeCuda()
    reg = HostRegistry(lambda a, n: seen.append((a, n)) or cuda.register(a, n), cuda.unregister)
    reg.mapped(PoolRegion(0x200000, 0x3000))
    reg.unmapped(PoolRegion(0x200000, 0x3000))
    assert seen == [(0x200000, 0x3000)] and cuda.registered == {}
