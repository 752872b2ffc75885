"""Fleet benchmark: one cache for many hosts, simulated on the Mooncake conversation trace.

Entry point: `run_fleet_bench(trace_path, json_out, png_out=None, hosts=(1, 2, 4, ..., 64))`, the
`kvtier bench fleet` command. It replays the trace's requests (metadata only: each hash id stands
for one prompt chunk) over H hosts, request i going to host i mod H (round-robin), and reports
chunk hit ratios under the store's prefix rule (a chunk is a hit only if every chunk before it in
the request is available somewhere: in the host's DRAM or in the shared tier), per H:

- `private`: each host has DRAM for `capacity_pct` (1) percent of the trace's distinct chunks, alone;
- `redis`: the same DRAM in front of a Redis server holding H percent of the distinct chunks and
  evicting like its `allkeys-lru` with kvtier's recommended `maxmemory-samples`
  (REDIS_RECOMMENDED_SETTINGS; RedisLRU: sampled keys, evict.c's pool of candidates, a clock in
  seconds; it knows nothing of chains, so it may evict a parent, even the one of the key being
  written, and strand its children, which then hold memory until sampled themselves);
  `redis_default_samples` the same with Redis's default 5 samples, `redis_lfu` with
  `allkeys-lfu` (RedisLFU), `redis_exact_lru` with exact LRU; a GET (a load) and a SET NX (a
  save, even of a key the server holds) refresh a key, EXISTS (a lookup) does not, nor does a
  hit the host serves from its own DRAM;
- `folder`: the same DRAM in front of a shared folder of H percent, evicted by its owner with the
  shared-folder tier's default policy. The owner's policy learns every chunk any host writes and
  every host's hits in the folder (the owner adopts new files and replays moved mtimes at its
  rescans, modelled here as continuous; kvtier.tiers.shared_folder says how);
- `redis_owner`: the same DRAM in front of an owner-managed Redis tier (RedisTierConfig.capacity_bytes
  > 0): the owner host's kvtier policy (RedisTierConfig.policy) learns every host's saves and hits
  from the access stream, in stream order, and deletes its victims. That is the folder's model
  (FOLDER_MODEL, reused: the column equals `folder` while the two tiers' default policies agree);
  tests/tiers/test_redis_owner.py replays a trace through real stores over a real owner-managed
  tier and gets exactly these hits. `judge` reads it for redis when the recommended mode
  (core.config.REDIS_RECOMMENDED_MODE) is "owner";
- `one_host`: one host with DRAM for H percent (the fleet's DRAM), every request: what `judge`
  compares the shared tiers against. Not a bound: their shared tier's H percent comes on top of
  the hosts' DRAM;
- `one_host_all`: one host with the fleet's whole cache, its DRAM and the shared tier's together
  (2H percent): the comparison at equal bytes, reported beside the judged one;
- `one_host_lru`: the same with plain LRU, for reading `redis`: a server that evicts by recency
  alone can at best approach this, not the DRAM default's `one_host`;
- `cache_aware`: private DRAM as in `private`, no shared tier, but each request routed by
  kvtier.router: every host's DRAM reports what it gains and loses as KV events (BlockStored /
  BlockRemoved, medium CPU) into a KVIndex, and CacheAwareRouter sends the request to the host
  with the longest cached prefix (a prefix cached nowhere: to its sticky host, by rendezvous hashing
  of its first chunk) while keeping every host within 1.5x its fair share of requests;
  `max_load_share` is the busiest host's request count over that fair share.

The DRAM tiers and the folder run the real policy objects (kvtier.tiers.policies), with the
defaults of MemoryTierConfig and SharedFolderTierConfig. A request on host h: lookup (each key in
h's DRAM, else in the shared tier; stop at the first key in neither), touch the hits where they
were found, promote the shared hits into h's DRAM, then save the rest of the request into h's DRAM
and write those not in the shared tier to it, parents first (write-through, as the store does),
after the ancestors the shared tier lacks (evicted there), from h's DRAM; if h's DRAM lacks one
too, the chain is not written (TieredStore._write_ancestors: a shared tier never gets an orphan).

With `real_payload=True` it also moves real chunks through two `kvtier serve` processes sharing
one folder (kvtier.bench.fleet_payload); the Redis payload figures are helper "redis"'s
kvtier.bench.redis, merged in when that module exists. With `vllm_runs=True`, the engine runs
named in `engine_runs`: "pd" (kvtier.bench.vllm_pd: `vllm_shared` and `pd`) and "routing"
(kvtier.bench.vllm_routing: the `routing` row, two vLLM servers behind the routing proxy against
round robin; the simulated rows' own routing is `simulated_routing`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

from kvtier.bench.trace import DEFAULT_TRACE, HitCounts, TraceFormatError, TraceRequest, distinct_chunks, load_requests
from kvtier.core.config import (
    REDIS_MODES,
    REDIS_RECOMMENDED_MODE,
    REDIS_RECOMMENDED_SETTINGS,
    MemoryTierConfig,
    RedisTierConfig,
    SharedFolderTierConfig,
)
from kvtier.events.wire import MEDIUM_CPU, BlockRemoved, BlockStored, KVEventBatch
from kvtier.router import CacheAwareRouter, KVIndex
from kvtier.tiers.policies import EvictionPolicy, make_policy

DEFAULT_HOSTS = (1, 2, 4, 8, 16, 32, 64)
Key = bytes


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


DRAM_POLICY: str = _default(MemoryTierConfig, "policy")  # what each host's DRAM tier runs by default
FOLDER_POLICY: str = _default(SharedFolderTierConfig, "policy")  # what the folder's owner runs by default
REDIS_OWNER_POLICY: str = _default(RedisTierConfig, "policy")  # what an owner-managed Redis tier's owner runs


class ServerLRU(EvictionPolicy):
    """Exact LRU over keys, chain or no chain: what Redis's `allkeys-lru` approximates (the
    `redis_exact_lru` column; RedisLRU below is the approximation the server really runs)."""

    name = "server-lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, keys: Sequence[Key]) -> None:
        for key in keys:  # GETs in chain order: the head is the oldest of the request's keys
            if key in self._order:
                self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        for key in self._order:
            if can_evict(key):
                del self._order[key]
                return key
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)


class _EvictionPool:
    """The server's pool of eviction candidates (evict.c's EVPOOL, 16 entries): scores ascending,
    a higher score evicted first. A sampled key enters if the pool has room or it scores above the
    lowest entry (which then drops out); among equal scores a newer entry sits to the left, so the
    one that entered first goes first. Entries keep the score they had when sampled; a pick takes
    the highest entry out, and an entry whose key is gone (a ghost) is dropped on the way."""

    SIZE = 16  # EVPOOL_SIZE

    def __init__(self) -> None:
        self.entries: list[tuple[int, Key]] = []  # (score, key), ascending by score

    def offer(self, score: int, key: Key) -> None:
        entries = self.entries
        k = 0
        while k < len(entries) and entries[k][0] < score:
            k += 1
        if len(entries) < self.SIZE:
            entries.insert(k, (score, key))
        elif k > 0:  # full: drop the lowest, insert just left of the first entry >= score
            entries.pop(0)
            entries.insert(k - 1, (score, key))

    def pick(self, exists: Callable[[Key], bool]) -> Key | None:
        while self.entries:
            _score, key = self.entries.pop()
            if exists(key):
                return key
        return None


class _RedisSampled(EvictionPolicy):
    """What Redis's sampled eviction shares between allkeys-lru and allkeys-lfu: a key set to
    sample `samples` keys from (maxmemory-samples, 5) and the pool. Each eviction samples once,
    offers the samples to the pool with the policy's score, and evicts the pool's best entry that
    still exists, sampling again while none does (performEvictions). The server may evict any
    key, a parent included (it knows nothing of chains). Sampling is uniform and seeded (Redis
    takes a few keys from consecutive buckets of its hash table starting at a random one: keys
    in random order, so a uniform sample stands for it), so a run is reproducible. `can_evict`
    (the simulator's guard of the parent of the key being written) does not bind the server. The clock is
    the trace's (`begin_request`), as for a server serving the trace live."""

    def __init__(self, samples: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.samples = samples
        self._rng = random.Random(seed)
        self._keys: list[Key] = []  # for uniform sampling, with its inverse:
        self._pos: dict[Key, int] = {}
        self._pool = _EvictionPool()
        self._now = 0.0

    def begin_request(self, now: float) -> None:
        self._now = now

    def _score(self, key: Key) -> int:
        raise NotImplementedError

    def _accessed(self, key: Key, new: bool) -> None:
        raise NotImplementedError

    def _forget(self, key: Key) -> None:
        raise NotImplementedError

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        new = key not in self._pos
        if new:
            self._pos[key] = len(self._keys)
            self._keys.append(key)
        self._accessed(key, new)

    def touch(self, keys: Sequence[Key]) -> None:
        for key in keys:
            if key in self._pos:
                self._accessed(key, False)

    def remove(self, key: Key) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i
        self._forget(key)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        keys = self._keys
        for _ in range(64):  # bounded: a pool of keys that may not go (never, for the server)
            if not keys:
                return None
            for i in self._rng.sample(range(len(keys)), min(self.samples, len(keys))):
                self._pool.offer(self._score(keys[i]), keys[i])
            victim = self._pool.pick(self._pos.__contains__)  # the server has no pins: can_evict does not bind it
            if victim is not None:
                self.remove(victim)
                return victim
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def __len__(self) -> int:
        return len(self._keys)


class RedisLRU(_RedisSampled):
    """`maxmemory-policy allkeys-lru` (evict.c, Redis 3.0 and later): each key keeps the LRU clock
    of its last access in whole seconds (LRU_CLOCK_RESOLUTION 1000 ms); the score is its idle
    time."""

    name = "redis-allkeys-lru"

    def __init__(self, samples: int = 5, seed: int = 0) -> None:
        super().__init__(samples, seed)
        self._clock: dict[Key, int] = {}  # key -> second of its last access

    def _score(self, key: Key) -> int:
        return int(self._now) - self._clock[key]

    def _accessed(self, key: Key, new: bool) -> None:
        self._clock[key] = int(self._now)

    def _forget(self, key: Key) -> None:
        del self._clock[key]


class RedisLFU(_RedisSampled):
    """`maxmemory-policy allkeys-lfu` (evict.c, Redis 4.0 and later): each key keeps an 8-bit
    logarithmic counter and the minute of its last access. A new key starts at 5 (LFU_INIT_VAL).
    An access first decays the counter by one per `decay_minutes` (lfu-decay-time, 1) elapsed
    since the last access, then raises it by one with probability 1 / ((counter - 5) * log_factor
    + 1) (lfu-log-factor, 10; certainly while at or below 5), saturating at 255, and stamps the
    minute. The score is 255 minus the decayed counter (the stamp is not moved by sampling)."""

    name = "redis-allkeys-lfu"
    INIT = 5  # LFU_INIT_VAL

    def __init__(self, samples: int = 5, seed: int = 0, log_factor: int = 10, decay_minutes: int = 1) -> None:
        super().__init__(samples, seed)
        self.log_factor = log_factor
        self.decay_minutes = decay_minutes
        self._counter: dict[Key, int] = {}
        self._minute: dict[Key, int] = {}  # minute of the last access (the LDT field)

    def _decayed(self, key: Key) -> int:
        counter = self._counter[key]
        if self.decay_minutes:
            periods = (int(self._now // 60) - self._minute[key]) // self.decay_minutes
            counter = max(0, counter - periods)
        return counter

    def _score(self, key: Key) -> int:
        return 255 - self._decayed(key)

    def _accessed(self, key: Key, new: bool) -> None:
        if new:
            counter = self.INIT
        else:
            counter = self._decayed(key)
            if counter < 255:
                base = max(0, counter - self.INIT)
                if self._rng.random() < 1.0 / (base * self.log_factor + 1):
                    counter += 1
        self._counter[key] = counter
        self._minute[key] = int(self._now // 60)

    def _forget(self, key: Key) -> None:
        del self._counter[key]
        del self._minute[key]


@dataclass(slots=True)
class _Cache:
    """A tier's metadata: resident keys and the policy that orders them."""

    policy: EvictionPolicy
    capacity: int
    resident: set[Key] = field(default_factory=set)

    def put(self, key: Key, parent: Key | None, depth: int) -> tuple[bool, Key | None]:
        """Store `key` if the policy admits it and room can be made; (stored?, the key evicted for it)."""
        if not self.policy.admit(key, parent, depth):
            return False, None
        victim = None
        if len(self.resident) >= self.capacity:
            victim = self.policy.evict(lambda k: k != parent)
            if victim is None:
                return False, None
            self.resident.discard(victim)
        self.resident.add(key)
        self.policy.insert(key, parent, depth)
        return True, victim


@dataclass(slots=True)
class _ReportingCache(_Cache):
    """A host's DRAM that records, as KV events, the chunks it gains and loses (as a host's
    KVEventPublisher would publish them); `take_batch` hands them over once per request, in the
    order they happened (runs of stores and removals)."""

    changes: list[tuple[bool, Key]] = field(default_factory=list)  # (stored?, key)

    def put(self, key: Key, parent: Key | None, depth: int) -> tuple[bool, Key | None]:
        stored, victim = _Cache.put(self, key, parent, depth)  # not super(): slots dataclasses
        if victim is not None:
            self.changes.append((False, victim))
        if stored:
            self.changes.append((True, key))
        return stored, victim

    def take_batch(self, ts: float) -> KVEventBatch:
        events: list[BlockStored | BlockRemoved] = []
        run: list[int | bytes] = []
        for i, (is_store, key) in enumerate(self.changes):
            run.append(key)
            if i + 1 == len(self.changes) or self.changes[i + 1][0] != is_store:
                events.append(BlockStored(run, None, [], 1, None, MEDIUM_CPU, None) if is_store
                              else BlockRemoved(run, MEDIUM_CPU))
                run = []
        self.changes.clear()
        return KVEventBatch(ts, events)  # type: ignore[arg-type]


def simulate_cache_aware(requests: Sequence[TraceRequest], hosts: int, dram_capacity: int,
                         max_load_share: float = 1.5, dram_policy: str = DRAM_POLICY) -> tuple[HitCounts, float]:
    """Private DRAM per host, requests routed by kvtier.router from the hosts' KV events; the hit
    counts and the busiest host's share of requests over its fair share. Hits are counted from
    the hosts' own DRAM; the index, fed only by events, decides where each request goes."""
    counts = HitCounts()
    drams = [_ReportingCache(make_policy(dram_policy), dram_capacity) for _ in range(hosts)]
    names = [f"host-{h}" for h in range(hosts)]
    index = KVIndex(block_size=1, weights={MEDIUM_CPU: 1.0})
    router = CacheAwareRouter(index, names, max_load_share)
    host_of = {name: h for h, name in enumerate(names)}
    half_at = len(requests) // 2
    for i, req in enumerate(requests):
        keys = req.keys
        h = host_of[router.pick(keys)]
        dram = drams[h]
        now = req.timestamp_ms / 1000.0
        dram.policy.begin_request(now)
        n = 0
        for key in keys:
            if key not in dram.resident:
                break
            n += 1
        counts.add(0 if i < half_at else 1, req, n)
        if n:
            dram.policy.touch(keys[:n])
        parent: Key | None = None
        for depth, key in enumerate(keys):
            if key in dram.resident:
                if depth >= n:
                    dram.policy.touch((key,))
            else:
                dram.put(key, parent, depth)
            parent = key
        index.apply(names[h], "kvtier", dram.take_batch(now))
    return counts, router.max_load_share()


@dataclass(slots=True, frozen=True)
class SharedTierModel:
    """How the tier below every host's DRAM behaves: its policy, and whose hits touch it."""

    name: str
    make_policy: Callable[[], EvictionPolicy]
    touched_by: str  # "every host" (Redis: GETs reach the server) or "owner" (host 0's own policy)
    saves_touch: bool = False  # a save of a chunk the tier holds refreshes it (Redis's SET NX looks the key up)


REDIS_SAMPLES = int(REDIS_RECOMMENDED_SETTINGS["maxmemory-samples"])
REDIS_MODEL = SharedTierModel("redis", partial(RedisLRU, REDIS_SAMPLES), "every host", saves_touch=True)
# allkeys-lru as an untuned server runs it (maxmemory-samples 5), and allkeys-lfu (lfu-log-factor 10,
# lfu-decay-time 1) with the recommended samples: for comparison
REDIS_DEFAULT_SAMPLES_MODEL = SharedTierModel("redis, 5 samples", partial(RedisLRU, 5), "every host", saves_touch=True)
REDIS_LFU_MODEL = SharedTierModel("redis, allkeys-lfu", partial(RedisLFU, REDIS_SAMPLES), "every host",
                                  saves_touch=True)
REDIS_EXACT_LRU_MODEL = SharedTierModel("redis, exact LRU", ServerLRU, "every host", saves_touch=True)
# An owner-managed shared tier: one host's kvtier policy orders every chunk, fed every host's saves and
# hits in one order (the folder: new files and moved mtimes at the owner's rescans; Redis with
# capacity_bytes: the access stream the owner replays), modelled as continuous. The folder and the
# owner-managed Redis tier are the same model; `redis_owner` is simulated apart only where the two
# tiers' default policies differ.
FOLDER_MODEL = SharedTierModel("folder", lambda: make_policy(FOLDER_POLICY), "every host")
REDIS_OWNER_MODEL = (FOLDER_MODEL if REDIS_OWNER_POLICY == FOLDER_POLICY else
                     SharedTierModel("redis, owner-managed", lambda: make_policy(REDIS_OWNER_POLICY), "every host"))
# The folder as it would be if only the owner's own hits reached its policy (before mtime touches)
FOLDER_OWNER_TOUCHES_MODEL = SharedTierModel("folder, owner's hits only", lambda: make_policy(FOLDER_POLICY), "owner")


def simulate_fleet(requests: Sequence[TraceRequest], hosts: int, dram_capacity: int,
                   shared: SharedTierModel | None = None, shared_capacity: int = 0,
                   dram_policy: str = DRAM_POLICY) -> HitCounts:
    """Replay `requests` round-robin over `hosts` hosts with `dram_capacity` chunks of DRAM each,
    over a shared tier of `shared_capacity` chunks (or none); chunk and token hits under the prefix rule."""
    counts = HitCounts()
    drams = [_Cache(make_policy(dram_policy), dram_capacity) for _ in range(hosts)]
    lower = _Cache(shared.make_policy(), shared_capacity) if shared is not None else None
    half_at = len(requests) // 2
    for i, req in enumerate(requests):
        h = i % hosts
        dram = drams[h]
        now = req.timestamp_ms / 1000.0
        dram.policy.begin_request(now)
        keys = req.keys
        in_dram: list[Key] = []
        in_lower: list[Key] = []
        n = 0
        for key in keys:
            if key in dram.resident:
                in_dram.append(key)
            elif lower is not None and key in lower.resident:
                in_lower.append(key)
            else:
                break
            n += 1
        counts.add(0 if i < half_at else 1, req, n)
        if in_dram:
            dram.policy.touch(in_dram)
        if lower is not None:
            lower.policy.begin_request(now)
            if in_lower and (shared is not None and (shared.touched_by == "every host" or h == 0)):
                lower.policy.touch(in_lower)
        parent: Key | None = None
        for depth, key in enumerate(keys):
            if key in dram.resident:
                if depth >= n:
                    dram.policy.touch((key,))
            else:
                dram.put(key, parent, depth)  # a shared hit promoted, or a new chunk saved
            parent = key
        if lower is not None and n < len(keys):  # the saved chunks go to the shared tier too, after
            # the ancestors it lacks (evicted there), from this host's DRAM; the chain stops if DRAM lacks one
            first = n
            while first > 0 and keys[first - 1] not in lower.resident and keys[first - 1] in dram.resident:
                first -= 1
            if first == 0 or keys[first - 1] in lower.resident:
                for depth in range(first, len(keys)):
                    key = keys[depth]
                    if key not in lower.resident:
                        lower.put(key, keys[depth - 1] if depth else None, depth)
                    elif depth >= n and shared is not None and shared.saves_touch:
                        lower.policy.touch((key,))
    return counts


@dataclass(slots=True, frozen=True)
class FleetRow:
    hosts: int
    capacity_pct: float
    private: float
    redis: float
    redis_exact_lru: float
    folder: float
    one_host: float
    one_host_lru: float
    one_host_all: float
    cache_aware: float = 0.0
    max_load_share: float = 0.0
    redis_default_samples: float = 0.0
    redis_lfu: float = 0.0
    redis_owner: float = 0.0  # Redis with capacity_bytes: its owner host evicts with kvtier's policy

    def as_dict(self) -> dict[str, float | int]:
        return {"hosts": self.hosts, "capacity_pct": self.capacity_pct, "private": self.private,
                "redis": self.redis, "redis_exact_lru": self.redis_exact_lru, "folder": self.folder, "one_host": self.one_host,
                "one_host_lru": self.one_host_lru, "one_host_all": self.one_host_all, "cache_aware": self.cache_aware,
                "max_load_share": self.max_load_share, "redis_default_samples": self.redis_default_samples,
                "redis_lfu": self.redis_lfu, "redis_owner": self.redis_owner}


def fleet_row(requests: Sequence[TraceRequest], hosts: int, distinct: int, capacity_pct: float = 1.0) -> FleetRow:
    """One row: hit ratios by chunk for H = `hosts` (shared tier and bound at H x capacity_pct percent)."""
    dram = max(1, round(distinct * capacity_pct / 100))
    shared = max(1, round(distinct * hosts * capacity_pct / 100))
    routed, load_share = simulate_cache_aware(requests, hosts, dram)
    folder = simulate_fleet(requests, hosts, dram, FOLDER_MODEL, shared).block_ratio()
    redis_owner = (folder if REDIS_OWNER_MODEL is FOLDER_MODEL
                   else simulate_fleet(requests, hosts, dram, REDIS_OWNER_MODEL, shared).block_ratio())
    return FleetRow(
        hosts=hosts,
        capacity_pct=capacity_pct,
        private=simulate_fleet(requests, hosts, dram).block_ratio(),
        redis=simulate_fleet(requests, hosts, dram, REDIS_MODEL, shared).block_ratio(),
        redis_exact_lru=simulate_fleet(requests, hosts, dram, REDIS_EXACT_LRU_MODEL, shared).block_ratio(),
        folder=folder,
        one_host=simulate_fleet(requests, 1, shared).block_ratio(),
        one_host_lru=simulate_fleet(requests, 1, shared, dram_policy="lru").block_ratio(),
        one_host_all=simulate_fleet(requests, 1, dram * hosts + shared).block_ratio(),
        cache_aware=routed.block_ratio(),
        max_load_share=load_share,
        redis_default_samples=simulate_fleet(requests, hosts, dram, REDIS_DEFAULT_SAMPLES_MODEL, shared).block_ratio(),
        redis_lfu=simulate_fleet(requests, hosts, dram, REDIS_LFU_MODEL, shared).block_ratio(),
        redis_owner=redis_owner,
    )


def judge(rows: Sequence[FleetRow], at_hosts: int = 4, share: float = 0.95,
          redis_mode: str = REDIS_RECOMMENDED_MODE) -> dict[str, Any]:
    """The issue's target: at `at_hosts` hosts, redis and folder reach `share` of one_host. Redis
    is judged in `redis_mode`, the mode kvtier recommends (core.config.REDIS_RECOMMENDED_MODE):
    "owner" reads the `redis_owner` column, "server" the `redis` column (the server's allkeys-lru);
    both are reported."""
    if redis_mode not in REDIS_MODES:
        raise ValueError(f"redis_mode {redis_mode!r} is unknown; choose one of {list(REDIS_MODES)}")
    row = next((r for r in rows if r.hosts == at_hosts), None)
    if row is None:
        return {"hosts": at_hosts, "met": None, "why": f"no row for {at_hosts} hosts"}
    bound = row.one_host
    redis_column = "redis_owner" if redis_mode == "owner" else "redis"
    columns = {"redis": redis_column, "folder": "folder", "private": "private",
               "redis_server_lru": "redis", "redis_owner": "redis_owner"}
    ratios = {name: (getattr(row, col) / bound if bound else None) for name, col in columns.items()}
    met = all(ratios[n] is not None and ratios[n] >= share for n in ("redis", "folder"))  # type: ignore[operator]
    whole = row.one_host_all  # equal bytes: reported, not judged (the target is against one_host)
    equal_bytes = {name: (getattr(row, col) / whole if whole else None) for name, col in columns.items()}
    return {"hosts": at_hosts, "share_required": share, "redis_mode": redis_mode, "vs_one_host": ratios, "met": met,
            "vs_one_host_all": equal_bytes}


def judge_routing(rows: Sequence[FleetRow], at_hosts: int = 4, share: float = 0.9,
                  max_load_share: float = 1.5) -> dict[str, Any]:
    """The router's target: at `at_hosts` hosts, cache_aware reaches `share` of one_host with the
    busiest host within `max_load_share` of its fair share."""
    row = next((r for r in rows if r.hosts == at_hosts), None)
    if row is None:
        return {"hosts": at_hosts, "met": None, "why": f"no row for {at_hosts} hosts"}
    ratio = row.cache_aware / row.one_host if row.one_host else None
    met = ratio is not None and ratio >= share and row.max_load_share <= max_load_share
    return {"hosts": at_hosts, "share_required": share, "max_load_share_allowed": max_load_share,
            "cache_aware_vs_one_host": ratio, "private_vs_one_host": row.private / row.one_host if row.one_host else None,
            "max_load_share": row.max_load_share, "met": met}


ENGINE_RUNS = ("pd", "routing")


def routing_line(row: dict[str, Any]) -> str:
    ca, rr = row["cache_aware"], row["round_robin"]
    return (f"routing (2 vLLM servers, real payloads): cache_aware_ttft_s {row['cache_aware_ttft_s']:.4f}, "
            f"round_robin_ttft_s {row['round_robin_ttft_s']:.4f} (ratio {row['ttft_ratio']:.3f}); cached fraction "
            f"{ca['cached_fraction']:.3f} vs {rr['cached_fraction']:.3f}; first visits {ca['first_visit_ttft_s']:.4f} "
            f"vs {rr['first_visit_ttft_s']:.4f} s; cache_aware requests {ca['requests_per_server']} "
            f"(max load share {row['max_load_share']:.3f})")


def run_fleet_bench(
    trace_path: str | Path = DEFAULT_TRACE,
    json_out: str | Path | None = None,
    png_out: str | Path | None = None,
    hosts: Sequence[int] = DEFAULT_HOSTS,
    capacity_pct: float = 1.0,
    max_requests: int | None = None,
    real_payload: bool = False,
    quiet: bool = False,
    vllm_runs: bool = False,
    vllm_quick: bool = False,
    vllm_repeats: int = 3,
    engine_runs: Sequence[str] = ENGINE_RUNS,
) -> dict[str, Any]:
    """Simulate every H in `hosts`; write JSON (and a PNG); optionally the real-payload run and the
    vLLM engine runs `vllm_shared` and `pd` (bench/vllm_pd.py; `vllm_quick`: its small model;
    `vllm_repeats`: workload passes on fresh documents, ratios reported as their medians), and
    `routing` (bench/vllm_routing.py: two servers behind the routing proxy, against round robin);
    `engine_runs` picks among them ("pd" runs vllm_shared and pd)."""
    unknown = [r for r in engine_runs if r not in ENGINE_RUNS]
    if unknown:
        raise ValueError(f"unknown engine runs {unknown}; known: {', '.join(ENGINE_RUNS)}")
    if not hosts or any(h < 1 for h in hosts):
        raise ValueError(f"hosts must be a non-empty list of positive counts, got {list(hosts)}")
    if capacity_pct <= 0:
        raise ValueError(f"capacity_pct must be positive, got {capacity_pct}")
    requests = load_requests(trace_path, max_requests)
    if not requests:
        raise TraceFormatError(f"{trace_path}: no requests")
    distinct = distinct_chunks(requests)
    started = time.perf_counter()
    rows = []
    for h in hosts:
        rows.append(fleet_row(requests, h, distinct, capacity_pct))
        if not quiet:
            r = rows[-1]
            print(f"[{time.perf_counter() - started:6.1f}s] {h:3d} hosts: private {r.private:.4f}  redis {r.redis:.4f} (owner-managed {r.redis_owner:.4f}, exact lru {r.redis_exact_lru:.4f}, "
                  f"5 samples {r.redis_default_samples:.4f}, lfu {r.redis_lfu:.4f})  "
                  f"folder {r.folder:.4f}  one_host {r.one_host:.4f} (lru {r.one_host_lru:.4f}, with the shared tier's "
                  f"bytes too {r.one_host_all:.4f})  "
                  f"cache_aware {r.cache_aware:.4f} (max load share {r.max_load_share:.3f})", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "trace": str(trace_path),
        "requests": len(requests),
        "chunk_references": sum(len(r.hash_ids) for r in requests),
        "distinct_chunks": distinct,
        "simulated_routing": "round-robin",  # of the simulated rows (`routing` is the engine row)
        "cache_aware_routing": ("kvtier.router: longest cached prefix from the hosts' KV events (cached nowhere: the sticky "
                                "host of the first chunk), each host within 1.5x its fair share"),
        "dram_policy": DRAM_POLICY,
        "folder_policy": FOLDER_POLICY,
        "redis_owner_policy": (f"{REDIS_OWNER_POLICY}, run by the owner host on every host's saves and hits "
                               "(redis_owner; the same model as folder)"),
        "redis_recommended_mode": REDIS_RECOMMENDED_MODE,
        "redis_policy": (f"allkeys-lru, maxmemory-samples {REDIS_SAMPLES} (kvtier's recommended settings): a pool "
                         "of 16, a clock in seconds; redis_default_samples: the same with Redis's default 5 "
                         f"samples; redis_lfu: allkeys-lfu, {REDIS_SAMPLES} samples, lfu-log-factor 10, "
                         "lfu-decay-time 1; redis_exact_lru: exact LRU"),
        "rows": [r.as_dict() for r in rows],
        "target": judge(rows),
        "routing_target": judge_routing(rows),
        "seconds": time.perf_counter() - started,
    }
    if real_payload:
        from kvtier.bench.fleet_payload import redis_payload, run_payload

        result["folder_payload"] = run_payload(quiet=quiet)
        result["redis"] = redis_payload(quiet=quiet)
    if vllm_runs and "pd" in engine_runs:
        from kvtier.bench.vllm_pd import run_engine_runs

        engines = run_engine_runs(quick=vllm_quick, repeats=vllm_repeats)
        result["vllm_shared"], result["pd"], result["vllm_details"] = (
            engines["vllm_shared"], engines["pd"], engines["details"])
        if not quiet:
            for run in ("vllm_shared", "pd"):
                print(f"{run}: " + ", ".join(f"{k} {v}" for k, v in result[run].items()
                                             if k not in ("cached_tokens", "per_repeat")),
                      file=sys.stderr)
    if vllm_runs and "routing" in engine_runs:
        from kvtier.bench.vllm_routing import run_routing_runs

        result["routing"] = run_routing_runs(quick=vllm_quick)
        if not quiet:
            print(routing_line(result["routing"]), file=sys.stderr)
    if not quiet:
        target = result["target"]
        shares = ", ".join(f"{k} {v:.3f}x" for k, v in target.get("vs_one_host", {}).items() if v is not None)
        print(f"at {target['hosts']} hosts, against one host with their DRAM: {shares}; "
              f"target (redis and folder >= {target.get('share_required')}x): met = {target['met']}", file=sys.stderr)
        whole = ", ".join(f"{k} {v:.3f}x" for k, v in target.get("vs_one_host_all", {}).items() if v is not None)
        if whole:
            print(f"  at equal bytes (one host with their DRAM and the shared tier's memory): {whole}", file=sys.stderr)
        routing = result["routing_target"]
        if routing.get("cache_aware_vs_one_host") is not None:
            print(f"at {routing['hosts']} hosts, cache_aware {routing['cache_aware_vs_one_host']:.3f}x one_host, max load share "
                  f"{routing['max_load_share']:.3f}; target (>= {routing['share_required']}x, <= "
                  f"{routing['max_load_share_allowed']}): met = {routing['met']}", file=sys.stderr)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if png_out is not None:
        plot(result, png_out)
    return result


def plot(result: dict[str, Any], png_out: str | Path) -> bool:
    """Chunk hit ratio against the number of hosts; False (with a message) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot")
        return False
    rows = result["rows"]
    x = [r["hosts"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style, label in (("one_host", "k--", "one host, H% DRAM (the fleet's DRAM)"),
                               ("one_host_all", "k-", "one host, 2H% (the fleet's DRAM and shared tier)"),
                               ("redis", "-", f"1% DRAM + Redis (H%, allkeys-lru, {REDIS_SAMPLES} samples)"),
                               ("redis_default_samples", ":", "1% DRAM + Redis (H%, allkeys-lru, 5 samples)"),
                               ("redis_lfu", ":", f"1% DRAM + Redis (H%, allkeys-lfu, {REDIS_SAMPLES} samples)"),
                               ("redis_exact_lru", "--", "1% DRAM + Redis (H%, exact LRU)"),
                               ("redis_owner", "-.", "1% DRAM + Redis (H%, owner-managed, kvtier's policy)"),
                               ("folder", "-", "1% DRAM + shared folder (H%, owner evicts)"),
                               ("one_host_lru", "k:", "one host, H% DRAM, plain LRU"),
                               ("private", ":", "1% DRAM per host, private"),
                               ("cache_aware", "-", "1% DRAM per host, cache-aware routing")):
        ax.plot(x, [r[name] for r in rows], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(h) for h in x])
    ax.set_xlabel("hosts H (round-robin routing)")
    ax.set_ylabel("chunk hit ratio (prefix rule)")
    ax.set_title(f"one cache for many hosts: {result['requests']} requests, {result['distinct_chunks']} chunks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_out, dpi=120)
    plt.close(fig)
    return True
