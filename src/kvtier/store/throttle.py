"""`--throttle-disk-gbps`: a testing aid that caps a disk tier's read speed.

The "never slower than recomputing" rule (planner.py) only shows where the disk is slower than
compute; a throttle makes that happen on any machine. `throttle_disk(store, gbps)` hangs a
`ReadThrottle` on the store's disk tier (its `read_hook`, called after every chunk read with
the bytes read and when the read started) and tells the cost estimates the tier's speed, so
the planner knows it from the first request instead of learning it from slow loads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kvtier.store.planner import ESTIMATES, CostEstimates


class ReadThrottle:
    """Reads through one throttle share `bytes_per_s`: each read reserves the next free interval
    of nbytes / bytes_per_s on one virtual channel and sleeps until that interval ends."""

    def __init__(self, bytes_per_s: float) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"--throttle-disk-gbps must be positive, got {bytes_per_s / 1e9!r}")
        self.bytes_per_s = float(bytes_per_s)
        self._free_at = 0.0  # time.perf_counter() when the channel is free again
        self._lock = threading.Lock()

    def __call__(self, nbytes: int, started: float | None = None) -> float:
        """Sleep until `nbytes` read from `started` (perf_counter; default now) fit under the cap; returns the sleep."""
        now = time.perf_counter()
        start = now if started is None else min(started, now)
        with self._lock:
            begin = max(start, self._free_at)
            end = begin + nbytes / self.bytes_per_s
            self._free_at = end
        wait = end - now
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


def throttle_disk(store: Any, gbps: float, estimates: CostEstimates = ESTIMATES) -> ReadThrottle:
    """Cap the disk tier of `store` (a TieredStore, or an InProcessClient around one) at `gbps` 1e9 B/s."""
    from kvtier.store.probe import tier_id

    tiered = getattr(store, "store", store)
    disk = getattr(tiered, "disk", None)
    if disk is None:
        raise ValueError("--throttle-disk-gbps: the store has no disk tier to throttle")
    throttle = ReadThrottle(gbps * 1e9)
    disk.read_hook = throttle
    estimates.cap_bandwidth(tier_id(store, "disk", "cpu"), throttle.bytes_per_s)
    return throttle
