"""tiers/pool.py: the page-aligned DRAM pool and the watchers told where it is."""

import numpy as np
import pytest

from kvtier.core.config import MemoryTierConfig
from kvtier.tiers.memory import MemoryTier
from kvtier.tiers.pool import PAGE_BYTES, PoolRegion, PoolWatchers, aligned_pool
from tests.conftest import CHUNK, TINY


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, PoolRegion]] = []

    def mapped(self, region: PoolRegion) -> None:
        self.calls.append(("mapped", region))

    def unmapped(self, region: PoolRegion) -> None:
        self.calls.append(("unmapped", region))


@pytest.mark.parametrize("nbytes", [1, PAGE_BYTES - 1, PAGE_BYTES, 5 * PAGE_BYTES + 17])
def test_aligned_pool_starts_on_a_page_and_has_the_size_asked(nbytes: int) -> None:
    pool = aligned_pool(nbytes)
    assert pool.dtype == np.uint8 and pool.nbytes == nbytes and pool.flags.c_contiguous
    assert int(pool.ctypes.data) % PAGE_BYTES == 0


@pytest.mark.parametrize("nbytes", [0, -1])
def test_aligned_pool_refuses_an_empty_or_negative_size(nbytes: int) -> None:
    with pytest.raises(ValueError, match="> 0"):
        aligned_pool(nbytes)


def test_memory_tier_reports_its_own_pool_page_aligned() -> None:
    tier = MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=5 * TINY.chunk_bytes(CHUNK) + 3))
    region = tier.pool_region()
    assert region.nbytes == 5 * TINY.chunk_bytes(CHUNK)  # whole slots only
    assert region.address % PAGE_BYTES == 0
    assert region.address == int(tier.slot_view(0).ctypes.data)
    assert region.end == int(tier.slot_view(4).ctypes.data) + tier.chunk_bytes


def test_memory_tier_reports_an_injected_pool_where_it_is() -> None:
    buf = bytearray(3 * TINY.chunk_bytes(CHUNK))
    tier = MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=len(buf)), pool=buf)
    assert tier.pool_region() == PoolRegion(int(np.frombuffer(buf, np.uint8).ctypes.data), len(buf))


def test_watchers_get_the_current_region_once_then_every_change_in_order() -> None:
    watchers, a, b = PoolWatchers(), Recorder(), Recorder()
    first, second = PoolRegion(4096, 8192), PoolRegion(1 << 20, 4096)
    watchers.add(a, first)
    watchers.add(a, first)  # the same watcher again: told nothing new
    watchers.add(b, None)  # no pool now: told of the next one
    watchers.unmapped(first)
    watchers.mapped(second)
    assert a.calls == [("mapped", first), ("unmapped", first), ("mapped", second)]
    assert b.calls == [("unmapped", first), ("mapped", second)]
