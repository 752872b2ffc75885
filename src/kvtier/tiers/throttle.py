"""A read-speed cap for a tier: the testing aid behind `--throttle-disk-gbps` and the disk tier's
`read_throttle_gbps` setting. The "never slower than recomputing" rule (store/planner.py) only
shows where a tier is slower than compute; a throttle makes that happen on any machine.
"""

from __future__ import annotations

import threading
import time


class ReadThrottle:
    """Reads through one throttle share `bytes_per_s`: each read reserves the next free interval
    of nbytes / bytes_per_s on one virtual channel and sleeps until that interval ends."""

    def __init__(self, bytes_per_s: float) -> None:
        if not bytes_per_s > 0:
            raise ValueError(f"a read throttle must be positive, got {bytes_per_s / 1e9!r} GB/s")
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


__all__ = ["ReadThrottle"]
