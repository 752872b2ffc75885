"""Short probes that seed the load planner's bandwidths, and the ids its estimates are kept under.

    tier_id(store, tier_name, device)   "memory->cpu", "disk:dev=2049->cuda:0", ...
    memcpy_probe(nbytes)                bytes, seconds of one host copy (best of a few)
    disk_probe(folder, nbytes)          bytes, seconds of a read of a fresh file dropped from the page cache

A disk estimate is kept per block device (st_dev of the root), not per folder, so every store
on one disk shares what was measured there; a throttled disk gets its own id. The device the
KV goes to is part of the id: host DRAM to a GPU is another path than host DRAM to host DRAM.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import numpy as np

PROBE_BYTES = 4 << 20


def _tiered(store: Any) -> Any:
    return getattr(store, "store", store)  # an InProcessClient holds its TieredStore as .store


def tier_id(store: Any, tier_name: str, device: str) -> str:
    """Where the planner keeps the estimate of loads from `tier_name` of `store` into `device`."""
    tiered = _tiered(store)
    if tier_name == "disk":
        disk = getattr(tiered, "disk", None)
        root = getattr(disk, "root", None)
        if root is None:  # the host service's disk: identified by its socket
            return f"disk:service={getattr(store, 'socket_path', '?')}->{device}"
        rate = getattr(getattr(disk, "read_hook", None), "bytes_per_s", None)
        capped = f":throttle={rate:.0f}" if rate is not None else ""
        try:
            where = f"dev={os.stat(root).st_dev}"
        except OSError:  # the folder is gone (its loads will fail and be recomputed): keep it apart
            where = f"root={root}"
        return f"disk:{where}{capped}->{device}"
    if hasattr(store, "socket_path"):
        return f"{tier_name}:service->{device}"
    return f"{tier_name}->{device}"


def memcpy_probe(nbytes: int = PROBE_BYTES, runs: int = 3) -> tuple[int, float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes, max(best, 1e-9)


def disk_probe(folder: str, nbytes: int = PROBE_BYTES) -> tuple[int, float] | None:
    """Write a probe file under `folder`, drop it from the page cache, time reading it back;
    None where the folder cannot be written (a read-only reader of another owner's folder)."""
    path = os.path.join(folder, f".kvtier-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        try:
            os.write(fd, data.tobytes())
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        buf = bytearray(nbytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            got = os.preadv(fd, [buf], 0)
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
        return (got, max(seconds, 1e-9)) if got > 0 else None
    except OSError:
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
