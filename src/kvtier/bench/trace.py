"""Trace-driven cache simulation: eviction policies and tier sizes on a Mooncake-format trace.

Entry point: `run_trace_bench(trace_path, json_out, png_out=None, capacities_pct=..., max_requests=None)`
(the `kvtier bench trace` command). It replays every request of the trace through the same
policy objects the tiers use (kvtier.tiers.policies), at several capacities given in chunks as
a percentage of the trace's distinct chunks, and reports hit ratios by chunk and by token:

- one tier, per registered policy (`simulate_tier`);
- a DRAM + disk pair (`simulate_two_tier`): DRAM holds `capacity` chunks, disk `disk_factor`
  times that; a DRAM eviction is demoted to disk, a disk hit is promoted to DRAM;
- the offline reference (`simulate_belady`): Belady's MIN with bypass, which knows the future
  and bounds every online policy from above;
- a second offline yardstick (`simulate_future_admission`): LRU that admits only chunks that
  will be asked for again. It knows which chunks have a future, not when: where it falls short
  of a target, no admission rule in front of LRU (however good its reuse predictor) reaches it;
- the metadata path of the real DRAM tier (`replay_metadata_path`): MemoryTier's index and
  policy driven through lookup/touch/write with tiny payloads, in chunk lookups per second.

The prefix rule holds everywhere: within a request, lookup stops at the first missing chunk and
no later chunk of that request counts as a hit, even if it happens to be resident; then every
chunk of the request is touched (if resident) or offered for insertion. Counts are reported for
the whole trace and for its first and second halves (by request count, from the same warm run):
tune on the first half, judge on the second.

The default (`default` in the JSON) is the library's default policy, the one MemoryTierConfig and
DiskTierConfig name, so the bench judges exactly what the tiers run; `vs_lru` gives its hit ratio
over LRU's at each capacity, and `first_half_choice` the policy the first half alone would pick.
`--trace synthetic:NAME` replays a generated trace (kvtier.bench.traces), and `run_trace_suite`
(`kvtier bench trace --suite`) replays LRU and the default on every generated trace and the given
trace file, reporting the default's ratio to LRU per trace and capacity.

Trace format (one JSON object a line): {"timestamp": ms, "input_length": tokens,
"output_length": tokens, "hash_ids": [block ids]}; each id is one block of 512 prompt tokens
(the last may be partial). Ids become 8-byte big-endian keys; a block's parent is the previous
id of the same request (None for the first).
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kvtier.core.errors import KVTierError
from kvtier.tiers.policies import POLICIES, EvictionPolicy, LRUPolicy, make_policy

BLOCK_TOKENS = 512
DEFAULT_CAPACITIES_PCT = (1, 2, 5, 10, 20, 50, 100)
DEFAULT_TRACE = Path(__file__).resolve().parents[3] / ".." / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"

Key = bytes


class TraceFormatError(KVTierError, ValueError):
    """A trace line is not a valid Mooncake request; the message names the file and line."""


@dataclass(slots=True, frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def keys(self) -> list[Key]:
        return [hash_key(h) for h in self.hash_ids]


def hash_key(hash_id: int) -> Key:
    return hash_id.to_bytes(8, "big")


def block_tokens(input_length: int, index: int) -> int:
    """Prompt tokens in block `index` of a request (the last block may be partial)."""
    return max(0, min(BLOCK_TOKENS, input_length - BLOCK_TOKENS * index))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(line: str, where: str) -> TraceRequest:
    """One trace line; TraceFormatError naming `where` (path:line) if it is not a valid request."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("timestamp", "input_length", "hash_ids"):
        if name not in obj:
            raise TraceFormatError(f"{where}: missing field {name!r}")
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        raise TraceFormatError(f"{where}: 'timestamp' must be a number of ms >= 0, got {ts!r}")
    length = obj["input_length"]
    if not _is_int(length) or length < 0:
        raise TraceFormatError(f"{where}: 'input_length' must be an integer >= 0, got {length!r}")
    output = obj.get("output_length", 0)
    if not _is_int(output) or output < 0:
        raise TraceFormatError(f"{where}: 'output_length' must be an integer >= 0, got {output!r}")
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(_is_int(h) and 0 <= h < 1 << 64 for h in ids):
        raise TraceFormatError(f"{where}: 'hash_ids' must be a list of integers in [0, 2**64)")
    if len(set(ids)) != len(ids):
        raise TraceFormatError(f"{where}: 'hash_ids' repeats a block id within one request")
    if len(ids) * BLOCK_TOKENS < length or (ids and (len(ids) - 1) * BLOCK_TOKENS >= length):
        raise TraceFormatError(
            f"{where}: {len(ids)} blocks of {BLOCK_TOKENS} tokens do not match input_length {length}"
        )
    return TraceRequest(float(ts), length, output, tuple(ids))


def load_trace(path: str | Path, max_requests: int | None = None) -> list[TraceRequest]:
    """Requests of a Mooncake-format jsonl trace, in file order; blank lines are skipped."""
    path = Path(path)
    requests: list[TraceRequest] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_requests is not None and len(requests) >= max_requests:
                break
            if line.strip():
                requests.append(parse_request(line, f"{path}:{lineno}"))
    return requests


def load_requests(trace: str | Path, max_requests: int | None = None, seed: int = 0) -> list[TraceRequest]:
    """A trace file, or `synthetic:NAME` for a generated trace (kvtier.bench.traces) of `max_requests`
    requests (12,000 if None) drawn with `seed`."""
    spec = str(trace)
    if spec.startswith("synthetic:"):
        from kvtier.bench.traces import generate

        return generate(spec[len("synthetic:"):], seed, 12000 if max_requests is None else max_requests)
    return load_trace(trace, max_requests)


def library_default_policy() -> str:
    """The eviction policy the tiers run unless configured otherwise (MemoryTierConfig's default)."""
    from kvtier.core.config import MemoryTierConfig

    return MemoryTierConfig().policy


def distinct_chunks(requests: Iterable[TraceRequest]) -> int:
    return len({h for r in requests for h in r.hash_ids})


# -- counting -------------------------------------------------------------------------------------


@dataclass(slots=True)
class HitCounts:
    """Chunk and token totals and hits, for the whole run and for each half."""

    blocks: list[int] = field(default_factory=lambda: [0, 0])
    block_hits: list[int] = field(default_factory=lambda: [0, 0])
    tokens: list[int] = field(default_factory=lambda: [0, 0])
    token_hits: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, half: int, req: TraceRequest, hits: int) -> None:
        n = len(req.hash_ids)
        self.blocks[half] += n
        self.block_hits[half] += hits
        self.tokens[half] += req.input_length
        self.token_hits[half] += min(req.input_length, hits * BLOCK_TOKENS)

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    def block_ratio(self, half: int | None = None) -> float:
        if half is None:
            return self._ratio(sum(self.block_hits), sum(self.blocks))
        return self._ratio(self.block_hits[half], self.blocks[half])

    def token_ratio(self, half: int | None = None) -> float:
        if half is None:
            return self._ratio(sum(self.token_hits), sum(self.tokens))
        return self._ratio(self.token_hits[half], self.tokens[half])


def _always(key: Key) -> bool:
    return True


def _prepared(requests: Sequence[TraceRequest]) -> list[tuple[int, float, TraceRequest, list[Key]]]:
    half_at = len(requests) // 2
    return [(0 if i < half_at else 1, r.timestamp_ms / 1000.0, r, r.keys) for i, r in enumerate(requests)]


# -- one tier -------------------------------------------------------------------------------------


def simulate_tier(requests: Sequence[TraceRequest], policy: EvictionPolicy, capacity: int) -> HitCounts:
    """Replay `requests` through one tier of `capacity` chunks driven by `policy`."""
    counts = HitCounts()
    resident: set[Key] = set()
    for half, now, req, keys in _prepared(requests):
        policy.begin_request(now)
        n = 0
        for key in keys:
            if key not in resident:
                break
            n += 1
        counts.add(half, req, n)
        if n:
            policy.touch(keys[:n])
        parent = keys[n - 1] if n else None
        for depth in range(n, len(keys)):
            key = keys[depth]
            if key in resident:
                policy.touch((key,))
            elif policy.admit(key, parent, depth):
                if len(resident) >= capacity:
                    victim = policy.evict(_always)
                    if victim is None:
                        parent = key
                        continue
                    resident.discard(victim)
                resident.add(key)
                policy.insert(key, parent, depth)
            parent = key
    return counts


# -- DRAM + disk ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _SimTier:
    policy: EvictionPolicy
    capacity: int
    resident: set[Key] = field(default_factory=set)

    def put(self, key: Key, parent: Key | None, depth: int) -> tuple[bool, Key | None]:
        """Insert if admitted; returns (inserted, evicted key or None)."""
        if not self.policy.admit(key, parent, depth):
            return False, None
        victim = None
        if len(self.resident) >= self.capacity:
            victim = self.policy.evict(_always)
            if victim is None:
                return False, None
            self.resident.discard(victim)
        self.resident.add(key)
        self.policy.insert(key, parent, depth)
        return True, victim


@dataclass(slots=True)
class TwoTierCounts:
    combined: HitCounts
    dram: HitCounts


def simulate_two_tier(requests: Sequence[TraceRequest], dram_policy: EvictionPolicy,
                      disk_policy: EvictionPolicy, capacity: int, disk_factor: int = 4) -> TwoTierCounts:
    """DRAM of `capacity` chunks over a disk of `disk_factor * capacity`.

    New chunks go to DRAM; a DRAM eviction is demoted to disk (if the disk policy admits it); a
    chunk found only on disk counts as a hit and is promoted to DRAM (it stays on disk too).
    """
    combined, dram_only = HitCounts(), HitCounts()
    dram = _SimTier(dram_policy, capacity)
    disk = _SimTier(disk_policy, capacity * disk_factor)
    parents: dict[Key, tuple[Key | None, int]] = {}

    def to_dram(key: Key, parent: Key | None, depth: int) -> None:
        _, victim = dram.put(key, parent, depth)
        if victim is not None and victim not in disk.resident:
            vparent, vdepth = parents[victim]
            disk.put(victim, vparent, vdepth)

    for half, now, req, keys in _prepared(requests):
        dram.policy.begin_request(now)
        disk.policy.begin_request(now)
        in_dram = 0
        for key in keys:
            if key not in dram.resident:
                break
            in_dram += 1
        n = in_dram
        for key in keys[in_dram:]:
            if key not in disk.resident:
                break
            n += 1
        combined.add(half, req, n)
        dram_only.add(half, req, in_dram)
        if in_dram:
            dram.policy.touch(keys[:in_dram])
        if n > in_dram:
            disk.policy.touch(keys[in_dram:n])
        parent = None
        for depth, key in enumerate(keys):
            parents[key] = (parent, depth)
            if depth >= in_dram:
                if key in dram.resident:
                    dram.policy.touch((key,))
                else:
                    to_dram(key, parent, depth)
            parent = key
    return TwoTierCounts(combined, dram_only)


# -- offline reference ------------------------------------------------------------------------------


def simulate_belady(requests: Sequence[TraceRequest], capacity: int) -> HitCounts:
    """Belady's MIN with bypass under the prefix rule: the offline optimum for this trace.

    On a miss, a chunk is admitted only if its next use comes before that of some cached chunk,
    which is then evicted (the cached chunk used furthest in the future; ties, which only arise
    between chunks never used again, go to the deeper chunk). A chunk is used no earlier than
    its parent, so the cache stays closed under parents: a victim never strands a cached child,
    and the prefix rule never hides a resident chunk. Chunks never used again leave at once.
    """
    never = float("inf")
    # next use of every reference, as a global position (request order, then chain order)
    flat: list[int] = [h for r in requests for h in r.hash_ids]
    next_use: list[float] = [never] * len(flat)
    last: dict[int, int] = {}
    for pos in range(len(flat) - 1, -1, -1):
        h = flat[pos]
        nxt = last.get(h)
        if nxt is not None:
            next_use[pos] = nxt
        last[h] = pos
    counts = HitCounts()
    cached: dict[int, float] = {}  # hash id -> its next use
    heap: list[tuple[float, int, int]] = []  # (-next use, -depth, hash id), lazy deletion
    half_at = len(requests) // 2
    pos = 0
    for i, req in enumerate(requests):
        hits = 0
        broken = False
        parent: int | None = None
        for depth, h in enumerate(req.hash_ids):
            nu = next_use[pos]
            pos += 1
            if h in cached:
                if not broken:
                    hits += 1
            else:
                broken = True
                if nu == never or (parent is not None and parent not in cached):
                    parent = h
                    continue
                if len(cached) >= capacity:
                    while True:
                        neg_nu, _, victim = heap[0]
                        if cached.get(victim) == -neg_nu:
                            break
                        heapq.heappop(heap)
                    if nu > -neg_nu:
                        parent = h
                        continue  # bypass: used later than everything cached
                    heapq.heappop(heap)
                    del cached[victim]
            if nu == never:
                cached.pop(h, None)  # dead: frees its slot now (its children are dead too)
            else:
                cached[h] = nu
                heapq.heappush(heap, (-nu, -depth, h))
            parent = h
        counts.add(0 if i < half_at else 1, req, hits)
    return counts


class _FutureAdmissionLRU(LRUPolicy):
    """LRU told, per request, whether a chunk is asked for again later (offline knowledge)."""

    name = "lru+future_admission"

    def __init__(self, last_request: dict[Key, int]) -> None:
        super().__init__()
        self._last_request = last_request
        self._request = -1

    def begin_request(self, now: float) -> None:
        self._request += 1  # simulate_tier calls this once per request, in order

    def admit(self, key: Key, parent: Key | None, depth: int) -> bool:
        return self._last_request[key] > self._request


def simulate_future_admission(requests: Sequence[TraceRequest], capacity: int) -> HitCounts:
    """LRU that never admits a chunk no later request asks for, and admits every other one.

    An offline yardstick beside Belady: it is given the future's "whether" (perfect admission,
    the most a reuse predictor could supply) but not its "when". A policy that beats it must
    also keep the chunks that come back soon over those that come back late.
    """
    last_request: dict[Key, int] = {}
    for i, req in enumerate(requests):
        for key in req.keys:
            last_request[key] = i
    return simulate_tier(requests, _FutureAdmissionLRU(last_request), capacity)


# -- the real tier's metadata path ----------------------------------------------------------------


def replay_metadata_path(requests: Sequence[TraceRequest], policy_name: str, capacity: int) -> dict[str, Any]:
    """Drive MemoryTier (index + policy) through the trace with 1-token chunks of 16 bytes.

    Per request: `lookup` the keys, `touch` the hit prefix, then `write` each later chunk that is
    not resident (allocate, fill, commit, with evictions) and `touch` those that are, as
    simulate_tier does, so both give the same hits. Reports chunk lookups/s (keys examined by lookup) and inserts/s
    (chunks committed), both measured over the whole replay's wall time.
    """
    from kvtier.core.config import MemoryTierConfig
    from kvtier.core.layout import KVLayout
    from kvtier.tiers.base import ChunkMeta
    from kvtier.tiers.memory import MemoryTier

    layout = KVLayout(1, 1, 4, dtype="float16")
    chunk_bytes = layout.chunk_bytes(1)
    config = MemoryTierConfig(capacity_bytes=capacity * chunk_bytes, policy=policy_name, verify_reads=False)
    tier = MemoryTier(layout, 1, config)
    payload = [bytes(layout.layer_bytes(1))]
    checksums = (0,)
    root = b"\0" * 8
    lookups = inserts = hits = 0
    lookup_s = write_s = 0.0
    keyed = [r.keys for r in requests]
    clock = time.perf_counter
    t0 = clock()
    for keys in keyed:
        t1 = clock()
        n = tier.lookup(keys)
        if n:
            tier.touch(keys[:n])
        t2 = clock()
        lookup_s += t2 - t1
        lookups += len(keys)
        hits += n
        parent = keys[n - 1] if n else root
        for depth in range(n, len(keys)):
            key = keys[depth]
            if tier.contains(key):
                tier.touch((key,))  # resident after a miss: refreshed, not a hit
            elif tier.write(ChunkMeta(key, parent, depth, 1, checksums), payload):
                inserts += 1
            parent = key
        write_s += clock() - t2
    elapsed = clock() - t0
    tier.close()
    return {
        "policy": policy_name,
        "capacity_chunks": capacity,
        "chunk_lookups": lookups,
        "inserts": inserts,
        "seconds": elapsed,
        "lookup_seconds": lookup_s,
        "write_seconds": write_s,
        "lookups_per_s": lookups / lookup_s if lookup_s else 0.0,
        "inserts_per_s": inserts / write_s if write_s else 0.0,
        "chunks_per_s_overall": lookups / elapsed if elapsed else 0.0,
        "block_hit_ratio": hits / max(1, lookups),
    }


# -- the benchmark ------------------------------------------------------------------------------------


def _policy_order() -> list[str]:
    return ["lru"] + sorted(name for name in POLICIES if name != "lru")


def choose_default(policies: dict[str, dict[str, list[float]]]) -> str:
    """The policy with the best mean first-half chunk hit ratio among those never below LRU there.

    Only the first half decides, so the second half judges the choice on requests it never saw.
    The bench reports it as `first_half_choice`; the policy it judges is the library's default.
    """
    lru = policies["lru"]["first_half_block_hit_ratio"]
    best, best_mean = "lru", sum(lru) / len(lru)
    for name, row in policies.items():
        first = row["first_half_block_hit_ratio"]
        if any(f < base - 1e-12 for f, base in zip(first, lru)):
            continue
        mean = sum(first) / len(first)
        if mean > best_mean + 1e-12:
            best, best_mean = name, mean
    return best


def ratio_to_lru(policies: dict[str, dict[str, list[float]]], name: str,
                 key: str = "block_hit_ratio") -> list[float | None]:
    """`name`'s hit ratio over LRU's at each capacity; None where LRU hits nothing."""
    return [h / b if b > 0 else None for h, b in zip(policies[name][key], policies["lru"][key])]


def never_below_lru(ratios: Sequence[float | None], floor: float = 0.99) -> bool:
    """Issue 16's target: at least `floor` x LRU wherever LRU hits anything (elsewhere nothing can be
    below it)."""
    return all(r is None or r >= floor for r in ratios)


def gap_closed(hit: float, lru: float, best: float) -> float | None:
    """Share of the LRU -> Belady gap that `hit` closes; None where there is no gap."""
    return (hit - lru) / (best - lru) if best - lru > 1e-12 else None


def judge_target(policies: dict[str, dict[str, list[float]]], optimal: dict[str, list[float]],
                 name: str, future_admission: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Issue 7's target for policy `name`: wherever LRU is below 0.8 of Belady it closes at least
    half of the gap, on the whole trace and on its second half, and it is never below LRU.

    With `future_admission` (simulate_future_admission's ratios), each half also says how much of
    the gap that offline yardstick closes, which tells whether perfect admission would suffice.
    """
    row, lru = policies[name], policies["lru"]
    out: dict[str, Any] = {"policy": name, "met": True}
    for label, key in (("whole", "block_hit_ratio"), ("second_half", "second_half_block_hit_ratio")):
        closed = [gap_closed(h, b, o) for h, b, o in zip(row[key], lru[key], optimal[key])]
        required = [b < 0.8 * o for b, o in zip(lru[key], optimal[key])]
        never_worse = all(h >= b - 1e-12 for h, b in zip(row[key], lru[key]))
        half_closed = all(c is not None and c >= 0.5 for c, need in zip(closed, required) if need)
        out[label] = {"gap_closed": closed, "required": required, "never_worse_than_lru": never_worse,
                      "half_gap_closed_where_required": half_closed}
        if future_admission is not None:
            out[label]["future_admission_gap_closed"] = [
                gap_closed(h, b, o) for h, b, o in zip(future_admission[key], lru[key], optimal[key])]
        out["met"] = out["met"] and never_worse and half_closed
    return out


def _simulate_named(requests: Sequence[TraceRequest], name: str, capacity: int) -> HitCounts:
    """simulate_tier with a fresh policy of registry name `name`."""
    return simulate_tier(requests, make_policy(name), capacity)


def run_trace_bench(
    trace_path: str | Path = DEFAULT_TRACE,
    json_out: str | Path | None = None,
    png_out: str | Path | None = None,
    capacities_pct: Sequence[float] = DEFAULT_CAPACITIES_PCT,
    max_requests: int | None = None,
    policies: Sequence[str] | None = None,
    disk_factor: int = 4,
    quiet: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Replay the trace through every policy and the offline reference; write JSON (and a PNG).

    `trace_path` is a Mooncake-format file or `synthetic:NAME` (see load_requests). Capacities are
    in chunks, `capacities_pct` percent of the trace's distinct chunks. The default is the library's
    default policy (always replayed, with LRU). The DRAM + disk pair runs LRU, the default and the
    best policy on the first half's mean (which may lose to LRU somewhere) in both tiers; the
    metadata path replays the real MemoryTier with the default policy at the capacity nearest 10%.
    """
    requests = load_requests(trace_path, max_requests, seed)
    if not requests:
        raise TraceFormatError(f"{trace_path}: no requests")
    distinct = distinct_chunks(requests)
    capacities = [max(1, round(distinct * pct / 100)) for pct in capacities_pct]
    default = library_default_policy()
    names = list(policies) if policies else _policy_order()
    for required in (default, "lru"):
        if required not in names:
            names.insert(0, required)
    started = time.perf_counter()

    def progress(what: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - started:7.1f}s] {what}", file=sys.stderr, flush=True)

    def ratios(label: str, simulate: Callable[[int], HitCounts]) -> dict[str, list[float]]:
        """Hit ratios by chunk and token, whole and per half, at each capacity."""
        row: dict[str, list[float]] = {k: [] for k in (
            "block_hit_ratio", "token_hit_ratio", "first_half_block_hit_ratio", "second_half_block_hit_ratio",
            "first_half_token_hit_ratio", "second_half_token_hit_ratio")}
        for capacity in capacities:
            counts = simulate(capacity)
            progress(f"{label} at {capacity} chunks")
            row["block_hit_ratio"].append(counts.block_ratio())
            row["token_hit_ratio"].append(counts.token_ratio())
            row["first_half_block_hit_ratio"].append(counts.block_ratio(0))
            row["second_half_block_hit_ratio"].append(counts.block_ratio(1))
            row["first_half_token_hit_ratio"].append(counts.token_ratio(0))
            row["second_half_token_hit_ratio"].append(counts.token_ratio(1))
        return row

    result_policies = {
        name: ratios(name, partial(_simulate_named, requests, name))
        for name in names
    }
    optimal = ratios("belady", lambda capacity: simulate_belady(requests, capacity))
    future_admission = ratios("LRU with future admission",
                              lambda capacity: simulate_future_admission(requests, capacity))

    first_half_choice = choose_default(result_policies)
    best_mean = max(result_policies, key=lambda n: sum(result_policies[n]["first_half_block_hit_ratio"]))
    two_tier: dict[str, Any] = {"disk_factor": disk_factor, "policies": {}}
    for name in dict.fromkeys(["lru", default, best_mean]):
        row: dict[str, list[float]] = {k: [] for k in ("block_hit_ratio", "token_hit_ratio",
                                                        "second_half_block_hit_ratio", "dram_block_hit_ratio")}
        for capacity in capacities:
            both = simulate_two_tier(requests, make_policy(name), make_policy(name), capacity, disk_factor)
            progress(f"DRAM + disk, {name} at {capacity} chunks")
            row["block_hit_ratio"].append(both.combined.block_ratio())
            row["token_hit_ratio"].append(both.combined.token_ratio())
            row["second_half_block_hit_ratio"].append(both.combined.block_ratio(1))
            row["dram_block_hit_ratio"].append(both.dram.block_ratio())
        two_tier["policies"][name] = row

    meta_capacity = capacities[min(range(len(capacities)), key=lambda i: abs(capacities_pct[i] - 10))]
    metadata = replay_metadata_path(requests, default, meta_capacity)
    progress("metadata path")

    result: dict[str, Any] = {
        "trace": str(trace_path),
        "requests": len(requests),
        "chunk_references": sum(len(r.hash_ids) for r in requests),
        "distinct_chunks": distinct,
        "capacities_pct": list(capacities_pct),
        "capacities": capacities,
        "default": default,
        "first_half_choice": first_half_choice,
        "best_first_half_mean": best_mean,
        "vs_lru": {"block_hit_ratio": ratio_to_lru(result_policies, default),
                   "second_half_block_hit_ratio": ratio_to_lru(result_policies, default,
                                                               "second_half_block_hit_ratio"),
                   "never_below_0.99x_lru": never_below_lru(ratio_to_lru(result_policies, default))},
        "policies": result_policies,
        "optimal": optimal,
        "future_admission": future_admission,
        "target": judge_target(result_policies, optimal, default, future_admission),
        "two_tier": two_tier,
        "metadata_path": metadata,
        "seconds": time.perf_counter() - started,
    }
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print_table(result)
    if png_out is not None:
        plot(result, png_out)
    return result


def run_trace_suite(
    traces: Sequence[str | Path] | None = None,
    json_out: str | Path | None = None,
    capacities_pct: Sequence[float] = DEFAULT_CAPACITIES_PCT,
    policies: Sequence[str] | None = None,
    floor: float = 0.99,
    seed: int = 0,
    max_requests: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """LRU and the library's default (and `policies`) on several traces: is the default >= `floor` x LRU
    at every capacity of every trace (where LRU hits anything)?

    `traces` are files or `synthetic:NAME` specs; by default every generated shape. Only the
    single-tier replay runs (no Belady, no two-tier pair), so the whole suite takes minutes.
    """
    from kvtier.bench.traces import SYNTHETIC_TRACES

    specs = [str(t) for t in traces] if traces else [f"synthetic:{name}" for name in SYNTHETIC_TRACES]
    default = library_default_policy()
    names = list(dict.fromkeys(["lru", default, *(policies or ())]))
    started = time.perf_counter()
    out: dict[str, Any] = {"default": default, "floor": floor, "seed": seed,
                           "capacities_pct": list(capacities_pct), "traces": {}}
    for spec in specs:
        requests = load_requests(spec, max_requests, seed)
        if not requests:
            raise TraceFormatError(f"{spec}: no requests")
        distinct = distinct_chunks(requests)
        capacities = [max(1, round(distinct * pct / 100)) for pct in capacities_pct]
        rows: dict[str, dict[str, list[float]]] = {}
        for name in names:
            row: dict[str, list[float]] = {"block_hit_ratio": [], "token_hit_ratio": []}
            for capacity in capacities:
                counts = simulate_tier(requests, make_policy(name), capacity)
                row["block_hit_ratio"].append(counts.block_ratio())
                row["token_hit_ratio"].append(counts.token_ratio())
            rows[name] = row
        vs_lru = ratio_to_lru(rows, default)
        out["traces"][spec] = {
            "requests": len(requests),
            "chunk_references": sum(len(r.hash_ids) for r in requests),
            "distinct_chunks": distinct,
            "capacities": capacities,
            "policies": rows,
            "default_vs_lru": vs_lru,
            "met": never_below_lru(vs_lru, floor),
        }
        if not quiet:
            print(f"[{time.perf_counter() - started:7.1f}s] {spec}", file=sys.stderr, flush=True)
    ratios = [r for t in out["traces"].values() for r in t["default_vs_lru"] if r is not None]
    out["min_default_vs_lru"] = min(ratios) if ratios else None
    out["met"] = all(t["met"] for t in out["traces"].values())
    out["seconds"] = time.perf_counter() - started
    if json_out is not None:
        Path(json_out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        print_suite_table(out)
    return out


def print_suite_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    default = result["default"]
    table = Table(title=f"chunk hit ratio, default ({default}) vs LRU: default / LRU = ratio "
                        f"(target >= {result['floor']}x wherever LRU hits)")
    table.add_column("trace", no_wrap=True)
    for pct in result["capacities_pct"]:
        table.add_column(f"{pct}%", justify="right")
    for spec, row in result["traces"].items():
        cells = [spec.removeprefix("synthetic:") if spec.startswith("synthetic:") else Path(spec).name]
        for hit, base, ratio in zip(row["policies"][default]["block_hit_ratio"],
                                    row["policies"]["lru"]["block_hit_ratio"], row["default_vs_lru"]):
            cells.append(f"{hit:.3f} / {base:.3f} = " + ("-" if ratio is None else f"{ratio:.3f}x"))
        table.add_row(*cells)
    console.print(table)
    low = result["min_default_vs_lru"]
    console.print(f"target met: {result['met']} (lowest ratio {'-' if low is None else f'{low:.4f}'}x)")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped or logged: rich would cut the columns to 80 characters
    lru, opt, default = result["policies"]["lru"], result["optimal"], result["default"]
    for label, key, okey in (("whole trace", "block_hit_ratio", "block_hit_ratio"),
                             ("second half", "second_half_block_hit_ratio", "second_half_block_hit_ratio")):
        table = Table(title=f"chunk hit ratio, {label} (default: {default}; x = ratio vs LRU / vs Belady)")
        table.add_column("capacity")
        for name in result["policies"]:
            table.add_column(name + (" *" if name == default else ""), justify="right")
        table.add_column("LRU + future admission", justify="right")
        table.add_column("belady", justify="right")
        for i, (pct, cap) in enumerate(zip(result["capacities_pct"], result["capacities"])):
            cells = [f"{pct}% ({cap})"]
            for row in [*result["policies"].values(), result["future_admission"]]:
                hit = row[key][i]
                vs_lru = hit / lru[key][i] if lru[key][i] else float("nan")
                vs_opt = hit / opt[okey][i] if opt[okey][i] else float("nan")
                cells.append(f"{hit:.3f} {vs_lru:.2f}x/{vs_opt:.2f}x")
            cells.append(f"{opt[okey][i]:.3f}")
            table.add_row(*cells)
        console.print(table)
    target = result["target"]
    table = Table(title=f"{target['policy']}: share of the LRU -> Belady gap closed "
                        "(* = required >= 0.5: LRU below 0.8 of Belady)")
    table.add_column("capacity")
    table.add_column("whole trace", justify="right")
    table.add_column("second half", justify="right")
    table.add_column("LRU + future admission: whole / second half", justify="right")
    for i, pct in enumerate(result["capacities_pct"]):
        cells = [f"{pct}%"]
        for label in ("whole", "second_half"):
            closed, need = target[label]["gap_closed"][i], target[label]["required"][i]
            cells.append(("-" if closed is None else f"{closed:.2f}") + (" *" if need else ""))
        cells.append(" / ".join("-" if c is None else f"{c:.2f}" for c in
                                (target[label]["future_admission_gap_closed"][i] for label in ("whole", "second_half"))))
        table.add_row(*cells)
    console.print(table)
    console.print(f"target met: {target['met']} (never worse than LRU: whole "
                  f"{target['whole']['never_worse_than_lru']}, second half {target['second_half']['never_worse_than_lru']})")
    vs_lru = result["vs_lru"]["block_hit_ratio"]
    console.print(f"default {default} / LRU by capacity: "
                  + ", ".join("-" if r is None else f"{r:.3f}x" for r in vs_lru)
                  + f" (>= 0.99x everywhere: {result['vs_lru']['never_below_0.99x_lru']}); "
                  f"the first half alone would choose {result['first_half_choice']}")
    meta = result["metadata_path"]
    console.print(f"metadata path (MemoryTier, {meta['policy']}, {meta['capacity_chunks']} chunks): "
                  f"{meta['lookups_per_s']:,.0f} chunk lookups/s, {meta['inserts_per_s']:,.0f} inserts/s")


def plot(result: dict[str, Any], png_out: str | Path) -> bool:
    """Hit ratio against capacity per policy; False (with a message) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    x = result["capacities_pct"]
    for ax, key, title in ((axes[0], "block_hit_ratio", "whole trace"),
                           (axes[1], "second_half_block_hit_ratio", "second half")):
        for name, row in result["policies"].items():
            is_base = name in ("lru", result["default"])  # FIFO often lies right on top of LRU
            ax.plot(x, row[key], marker="o", linewidth=2.5 if is_base else 1.2, zorder=3 if is_base else 2,
                    label=name + (" (default)" if name == result["default"] else ""))
        ax.plot(x, result["future_admission"][key], "k:", marker="^", label="LRU + future admission (offline)")
        ax.plot(x, result["optimal"][key], "k--", marker="s", label="Belady MIN (offline)")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (% of distinct chunks)")
        ax.set_title(f"chunk hit ratio, {title}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("chunk hit ratio (prefix rule)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_out, dpi=120)
    plt.close(fig)
    return True
