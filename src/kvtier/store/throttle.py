"""`--throttle-disk-gbps`: a testing aid that caps a disk tier's read speed.

The "never slower than recomputing" rule (planner.py) only shows where the disk is slower than
compute; a throttle makes that happen on any machine. `throttle_disk(store, gbps)` hangs a
`ReadThrottle` on the store's disk tier (its `read_hook`, called after every chunk read with
the bytes read and when the read started) and tells the cost estimates the tier's speed, so
the planner knows it from the first request instead of learning it from slow loads. A store
built from a config gets the same throttle from `disk.read_throttle_gbps` (a `kvtier serve`
behind vLLM: its disk tier then reports the cap as its read bandwidth from the start).
"""

from __future__ import annotations

from typing import Any

from kvtier.store.planner import ESTIMATES, CostEstimates
from kvtier.tiers.throttle import ReadThrottle


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
