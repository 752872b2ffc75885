"""The DRAM pool's memory, as connectors that copy to and from it see it (no torch here).

    aligned_pool(nbytes)      a uint8 numpy array starting on a page boundary (whole pages)
    PoolRegion(address, nbytes)  where a pool lives in this process's address space
    PoolWatcher               mapped(region) / unmapped(region): told when a pool appears or goes
    PoolWatchers              the watchers of one owner (a TieredStore, a service client)

Why: on a GPU the pool is page-locked, so host <-> GPU copies from its slots run at the PCIe
limit and asynchronously. Page-locking is a CUDA call, and only connectors/ may import torch,
so the tiers only say where their pool is and when it goes away; connectors/copy_engine.py
registers it with CUDA (cudaHostRegister) and unregisters it before it is unmapped. A pool
that starts on a page boundary is registered exactly, never together with its neighbours.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

PAGE_BYTES = mmap.PAGESIZE


def aligned_pool(nbytes: int, page: int = PAGE_BYTES) -> np.ndarray:
    """A uint8 array of `nbytes` whose first byte is page-aligned (at most one page more is allocated)."""
    if nbytes <= 0:
        raise ValueError(f"pool size must be > 0, got {nbytes}")
    raw = np.empty(nbytes + page, dtype=np.uint8)
    skip = -int(raw.ctypes.data) % page
    return raw[skip:skip + nbytes]


@dataclass(slots=True, frozen=True)
class PoolRegion:
    address: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.address + self.nbytes


class PoolWatcher(Protocol):
    def mapped(self, region: PoolRegion) -> None: ...

    def unmapped(self, region: PoolRegion) -> None: ...


class PoolWatchers:
    """The watchers of one owner's pool: each is told of the current pool when it is added (once,
    however often it is added) and of every later mapping and unmapping, in order."""

    def __init__(self) -> None:
        self._watchers: list[PoolWatcher] = []
        self._lock = threading.Lock()

    def add(self, watcher: PoolWatcher, current: PoolRegion | None) -> None:
        with self._lock:
            if any(w is watcher for w in self._watchers):
                return
            self._watchers.append(watcher)
        if current is not None:
            watcher.mapped(current)

    def mapped(self, region: PoolRegion) -> None:
        for w in self._snapshot():
            w.mapped(region)

    def unmapped(self, region: PoolRegion) -> None:
        for w in self._snapshot():
            w.unmapped(region)

    def _snapshot(self) -> list[PoolWatcher]:
        with self._lock:
            return list(self._watchers)
