"""Load or recompute: how much of a stored prefix is worth loading (issue 17, "never slower").

Loading a stored chunk saves computing its tokens but costs moving its bytes out of the tier
that holds it. On a CPU compute is slow and loading nearly always pays; on a GPU, or from a
slow or throttled disk, moving a chunk can take longer than computing it. Connectors call

    n = chunks_worth_loading(tiers, chunk_bytes, chunk_tokens, bandwidths, seconds_per_token)

with the tier of each stored chunk of a prompt (in prompt order) and load only the first n;
the rest is recomputed with the uncached suffix. n minimizes the estimated prefill time
sum(load of chunks < n) + sum(compute of chunks >= n), i.e. it ends the prefix where the
running sum of (load - compute) per chunk is smallest, so the estimate never exceeds plain
recompute. An unknown estimate means "load" (today's behaviour): a connector that has never
timed a forward, or a tier that was never probed, loads everything.

The estimates (`CostEstimates`) are decayed sums, so later measurements outweigh the probe:

    bandwidth(tier_id)              bytes/s: seeded by a probe (or a throttle), refined by loads
    observe_load(tier_id, n, s)     a load of n bytes that took s seconds
    seconds_per_token(engine_id)    marginal compute cost of one prompt token
    observe_compute(engine_id, tokens, s)   a forward over `tokens` tokens that took s seconds
    head_overhead(engine_id)        what a head forward (head_and_loads) costs beyond its tokens

Compute is seconds / tokens over the decayed observations. Connectors report only forwards of
at least a few chunks (MIN_OBSERVED_CHUNKS): a short forward is mostly fixed per-forward cost,
which a fitted slope would have to separate from the per-token cost, and on noisy machines such
fits swing far either way. The per-forward overhead left in the ratio over-states the cost of a
token by overhead / tokens, so the planner errs towards loading, today's behaviour.
`ESTIMATES` is the process's shared instance: estimates keyed by tier
and engine survive a store or connector reopen within the process, which a probe-per-open
would not; tests pass their own instance.

No torch: probes that need the accelerator live with the connectors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DECAY = 0.7  # weight kept by older observations at each new one
MIN_OBSERVED_CHUNKS = 4  # forwards shorter than this many chunks are not timed for the compute estimate
HEAD_MIN_GAIN = 0.1  # a head plan must beat the serial plan's estimate by this fraction of it, too
THROTTLE = "throttle"
PROBE = "probe"


@dataclass(slots=True)
class _Rate:
    """Decayed sums of (bytes, seconds): bandwidth = bytes / seconds; `cap` bounds it (a throttle)."""

    bytes: float = 0.0
    seconds: float = 0.0
    source: str = ""
    cap: float | None = None
    samples: int = 0

    def value(self) -> float | None:
        if self.seconds <= 0.0 or self.bytes <= 0.0:
            return self.cap
        bw = self.bytes / self.seconds
        return min(bw, self.cap) if self.cap is not None else bw


class CostEstimates:
    """Per-tier bandwidths and per-engine compute costs, shared by every store and connector that
    names the same tier or engine (thread-safe: loads are observed from worker threads)."""

    def __init__(self) -> None:
        self._rates: dict[str, _Rate] = {}
        self._compute: dict[str, _Rate] = {}  # tokens per second
        self._head: dict[str, tuple[float, float]] = {}  # engine -> decayed (sum of extra seconds, weight)
        self._lock = threading.Lock()

    # -- tiers -----------------------------------------------------------------------------
    def bandwidth(self, tier_id: str) -> float | None:
        with self._lock:
            r = self._rates.get(tier_id)
            return r.value() if r is not None else None

    def source(self, tier_id: str) -> str:
        with self._lock:
            r = self._rates.get(tier_id)
            return r.source if r is not None else ""

    def has_bandwidth(self, tier_id: str) -> bool:
        return self.bandwidth(tier_id) is not None

    def seed_bandwidth(self, tier_id: str, nbytes: float, seconds: float, source: str = PROBE) -> None:
        """Start a tier's estimate from a probe (replaces what was there)."""
        _check_positive(nbytes, seconds)
        with self._lock:
            old = self._rates.get(tier_id)
            self._rates[tier_id] = _Rate(float(nbytes), float(seconds), source, old.cap if old else None, 1)

    def cap_bandwidth(self, tier_id: str, bytes_per_s: float) -> None:
        """A throttle: the tier never reads faster than this, and its estimate starts there."""
        if not bytes_per_s > 0.0:
            raise ValueError(f"a bandwidth cap must be positive, got {bytes_per_s!r}")
        with self._lock:
            self._rates[tier_id] = _Rate(float(bytes_per_s), 1.0, THROTTLE, float(bytes_per_s), 1)

    def observe_load(self, tier_id: str, nbytes: float, seconds: float) -> None:
        if not (0 < nbytes < math.inf and 0 < seconds < math.inf):  # NaN and inf too: one would stay in the sums
            return
        with self._lock:
            r = self._rates.setdefault(tier_id, _Rate())
            r.bytes = r.bytes * DECAY + nbytes
            r.seconds = r.seconds * DECAY + seconds
            r.samples += 1
            if r.source in ("", PROBE):
                r.source = "measured"

    # -- engines ---------------------------------------------------------------------------
    def seconds_per_token(self, engine_id: str) -> float | None:
        with self._lock:
            r = self._compute.get(engine_id)
            rate = r.value() if r is not None else None
            return 1.0 / rate if rate else None

    def observe_compute(self, engine_id: str, tokens: int, seconds: float) -> None:
        if not (0 < tokens < math.inf and 0 < seconds < math.inf):  # NaN and inf too: one would stay in the sums
            return
        with self._lock:
            r = self._compute.setdefault(engine_id, _Rate(source="measured"))
            r.bytes = r.bytes * DECAY + tokens
            r.seconds = r.seconds * DECAY + seconds
            r.samples += 1

    def observe_head(self, engine_id: str, tokens: int, seconds: float) -> None:
        """A head forward (head_and_loads) over `tokens` took `seconds`: what it took beyond the per-token
        estimate is its fixed cost (a forward's own overhead, and on a CPU the loads' threads beside it)."""
        if not (0 < tokens < math.inf and 0 <= seconds < math.inf):
            return
        spt = self.seconds_per_token(engine_id)
        if spt is None:
            return
        extra = max(0.0, seconds - tokens * spt)
        with self._lock:
            total, weight = self._head.get(engine_id, (0.0, 0.0))
            self._head[engine_id] = (total * DECAY + extra, weight * DECAY + 1.0)

    def head_overhead(self, engine_id: str) -> float | None:
        """Seconds a head forward costs beyond its tokens' compute; None before one was timed."""
        with self._lock:
            got = self._head.get(engine_id)
            return got[0] / got[1] if got else None

    def forget(self) -> None:
        with self._lock:
            self._rates.clear()
            self._compute.clear()
            self._head.clear()

    def snapshot(self) -> dict[str, dict[str, float | str | None]]:
        """What is known, for benchmarks' JSON: {id: {bandwidth|seconds_per_token, source, samples}}."""
        with self._lock:
            out: dict[str, dict[str, float | str | None]] = {}
            for k, r in self._rates.items():
                out[k] = {"bytes_per_s": r.value(), "source": r.source, "samples": float(r.samples)}
            for k, c in self._compute.items():
                rate = c.value()
                out[k] = {"seconds_per_token": 1.0 / rate if rate else None, "source": "measured",
                          "samples": float(c.samples)}
            return out


ESTIMATES = CostEstimates()


def chunks_worth_loading(tiers: Sequence[str], chunk_bytes: int, chunk_tokens: int,
                         bandwidths: Mapping[str, float | None], seconds_per_token: float | None) -> int:
    """Leading chunks whose loading is estimated to cost less than recomputing them.

    `tiers[i]` names the tier holding chunk i (a key of `bandwidths`). Chunk i costs
    chunk_bytes / bandwidth to load and chunk_tokens * seconds_per_token to compute; the
    answer is the n that minimizes sum(load[:n]) + sum(compute[n:]) (the smallest such n on
    a tie, so a load must strictly pay). Unknown compute cost: load all; unknown bandwidth:
    that chunk is taken to pay.
    """
    if seconds_per_token is None:
        return len(tiers)
    compute = chunk_tokens * seconds_per_token
    best_n, best, acc = 0, 0.0, 0.0
    for i, tier in enumerate(tiers):
        bw = bandwidths.get(tier)
        load = chunk_bytes / bw if bw else 0.0
        acc += load - compute
        if acc < best:
            best, best_n = acc, i + 1
    return best_n


def head_and_loads(tiers: Sequence[str], chunk_bytes: int, chunk_tokens: int,
                   bandwidths: Mapping[str, float | None], seconds_per_token: float | None,
                   head_overhead_s: float | None = None) -> tuple[int, int]:
    """Compute the head of a stored prefix while its tail loads ("Compute Or Load KV Cache? Why Not Both?").

    Returns (head, n): chunks [0, head) are computed by a forward of their own while chunks
    [head, n) load, then the rest, stored chunks [n, len(tiers)) included, is computed with the
    uncached suffix. Computing the head needs no stored KV, so it runs while the tail's bytes
    move: the estimate is max(head compute, tail load) + compute of [n, len). (0, n) is the
    serial plan of chunks_worth_loading, estimated sum(load[:n]) + compute[n:]; a head is
    planned only where it beats that by more than its forward's fixed cost (`head_overhead_s`,
    CostEstimates.head_overhead, measured on earlier heads; never less than one chunk's compute)
    and by HEAD_MIN_GAIN of the serial estimate: a gain within the estimates' noise is not worth a
    second forward. So where loading is far cheaper than computing (DRAM on a CPU), or far
    slower (a disk that cannot deliver in time), the plan stays serial.
    """
    serial = chunks_worth_loading(tiers, chunk_bytes, chunk_tokens, bandwidths, seconds_per_token)
    u = len(tiers)
    if seconds_per_token is None or u < 2:
        return 0, serial
    compute = chunk_tokens * seconds_per_token
    acc = [0.0]
    for tier in tiers:
        bw = bandwidths.get(tier)
        acc.append(acc[-1] + (chunk_bytes / bw if bw else 0.0))
    serial_t = acc[serial] + (u - serial) * compute
    best_t = min(serial_t - max(compute, head_overhead_s or 0.0), serial_t * (1.0 - HEAD_MIN_GAIN))
    best = (0, serial)
    for n in range(2, u + 1):
        # max(k * compute, acc[n] - acc[k]) over 1 <= k < n: the first term grows with k, the second
        # shrinks, so the best k is where they cross (found by bisection) or just before it
        lo, hi = 1, n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if mid * compute >= acc[n] - acc[mid]:
                hi = mid
            else:
                lo = mid + 1
        for k in (lo - 1, lo):
            if 1 <= k < n:
                t = max(k * compute, acc[n] - acc[k]) + (u - n) * compute
                if t < best_t:
                    best_t, best = t, (k, n)
    return best


def _check_positive(nbytes: float, seconds: float) -> None:
    if not (nbytes > 0 and seconds > 0):
        raise ValueError(f"a probe needs positive bytes and seconds, got {nbytes!r} bytes in {seconds!r} s")
