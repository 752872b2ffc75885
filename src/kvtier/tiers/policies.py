"""Eviction policies: small strategy objects in a registry, shared by every tier and by the
trace simulator (kvtier.bench.trace).

A policy sees each chunk's parent and depth. In a prefix cache a chunk is useless without
its parent (lookup stops at the first miss), so evicting a parent strands its children:
every policy here evicts only chunks with no cached child ("leaves") while one exists,
which means the head of a chain is never evicted before its tail.

Protocol (called by a tier under the tier's lock):
    admit(key, parent, depth) -> bool   may this new chunk be cached at all?
    insert(key, parent, depth)          a chunk became resident
    touch(keys)                         a hit on a chain's leading chunks, in chain order;
                                        policies apply it tail-first (the head ends freshest)
    remove(key)                         a chunk left for another reason (delete, corruption)
    evict(can_evict) -> key | None      choose, forget and return a victim; `can_evict`
                                        says whether a key may go (a pinned chunk may not)
    begin_request(now)                  optional (default no-op): a request starts at `now`
                                        seconds; the trace simulator calls it, tiers need not

Policies (the registry POLICIES, `make_policy(name)`):
    lru     least recently used
    fifo    first in, first out; hits do not reorder
    arc     Adaptive Replacement Cache: recency and frequency lists sized by ghost hits
    s3fifo  S3-FIFO: a small probation FIFO, a main CLOCK, a ghost of keys evicted unused
    lrfu    least recently/frequently used: exponentially decayed access counts, a ghost of
            evicted scores, optional depth weighting, and optionally no admission of a chunk
            whose parent is not cached (a prefix lookup could never reach it)
    adaptive  LRU plus a shift by use count (chunks seen once leave sooner, chunks used again
            stay longer), the shift chosen online by miniature simulations of a hashed sample
            of the keys, one per candidate; starts as LRU
    guarded adaptive behind an LRUGuard (the default): it evicts in exact LRU order (a second,
            plain-recency leaf queue) while its candidates choose LRU, and also while an LRU shadow
            of the tier, fed the same references, has recently hit more than the tier itself
The last six keep their order in leaf queues (a heap that holds only leaves), O(log n)
amortized per operation; those that size anything by the tier's capacity learn it as the
largest resident count at an eviction (a tier evicts only when full). Measured on a production trace by
kvtier.bench.trace (`kvtier bench trace`).
"""

from __future__ import annotations

import heapq
import math
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvtier.core.errors import ConfigError

Key = bytes


class EvictionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self._parent: dict[Key, Key | None] = {}  # cached key -> its parent
        # key -> how many cached keys name it as parent. A key that is not cached keeps its count
        # while it is above 0 (removed, or not yet cached, under cached children): cached again,
        # it starts with its true count, and a child leaving later never takes it below 0 (at -1
        # it would never be a leaf again, and a tier that evicts only leaves would keep it forever)
        self._children: dict[Key, int] = {}

    # -- structure bookkeeping shared by all policies ------------------------------
    def _link(self, key: Key, parent: Key | None) -> None:
        self._parent[key] = parent
        children = self._children
        children.setdefault(key, 0)
        if parent is not None:
            children[parent] = children.get(parent, 0) + 1

    def _unlink(self, key: Key) -> None:
        parent = self._parent.pop(key, None)
        children = self._children
        if not children.get(key):  # a count above 0 outlives the key (see __init__)
            children.pop(key, None)
        if parent is not None:
            left = children[parent] - 1
            if left:
                children[parent] = left
            elif parent in self._parent:
                children[parent] = 0
                self._became_leaf(parent)
            else:
                del children[parent]

    def _became_leaf(self, key: Key) -> None:
        """Hook: `key` just lost its last cached child (policies with leaf indexes re-file it)."""
        return None

    def is_leaf(self, key: Key) -> bool:
        return self._children.get(key, 0) == 0

    def __contains__(self, key: object) -> bool:
        return key in self._parent

    def __len__(self) -> int:
        return len(self._parent)

    # -- the protocol --------------------------------------------------------------
    def begin_request(self, now: float) -> None:
        """A request starts at `now` (seconds, any fixed origin); optional, default no-op."""
        return None

    def admit(self, key: Key, parent: Key | None, depth: int) -> bool:
        return True

    @abstractmethod
    def insert(self, key: Key, parent: Key | None, depth: int) -> None: ...

    @abstractmethod
    def touch(self, keys: Sequence[Key]) -> None: ...

    @abstractmethod
    def remove(self, key: Key) -> None: ...

    @abstractmethod
    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None: ...


def _pick_from_order(order: OrderedDict[Key, None], policy: EvictionPolicy,
                     can_evict: Callable[[Key], bool]) -> Key | None:
    """Oldest evictable leaf in `order`, else the oldest evictable chunk at all."""
    fallback = None
    for key in order:
        if can_evict(key):
            if policy.is_leaf(key):
                return key
            if fallback is None:
                fallback = key
    return fallback


# -- leaf-ordered queues for the policies below ---------------------------------------------------


class _LeafQueue:
    """Keys with a priority; `pop` returns the lowest-priority evictable *leaf* of its policy.

    A binary heap with lazy deletion: every priority change pushes a fresh entry (stale ones are
    skipped when they surface), and a key is (re)pushed when it becomes a leaf, so a non-leaf is
    never scanned over more than once. O(log n) per operation, amortized, where _pick_from_order
    on a first-in-first-out order can scan every cached parent on each eviction.
    """

    __slots__ = ("_heap", "_entry", "_seq", "_policy", "last_priority")

    def __init__(self, policy: EvictionPolicy) -> None:
        self._heap: list[tuple[float, int, Key]] = []
        self._entry: dict[Key, tuple[float, int]] = {}  # key -> (priority, seq of its live entry)
        self._seq = 0
        self._policy = policy
        self.last_priority = 0.0  # priority of the key `pop` or `pop_any` returned last

    def __contains__(self, key: object) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def priority(self, key: Key) -> float:
        return self._entry[key][0]

    def set(self, key: Key, priority: float) -> None:
        """Add `key` or change its priority (lower goes first)."""
        self._seq += 1
        self._entry[key] = (priority, self._seq)
        if self._policy.is_leaf(key):
            heapq.heappush(self._heap, (priority, self._seq, key))
            if len(self._heap) > 2 * len(self._entry) + 1024:
                self._compact()

    def became_leaf(self, key: Key) -> None:
        entry = self._entry.get(key)
        if entry is not None:
            heapq.heappush(self._heap, (entry[0], entry[1], key))

    def discard(self, key: Key) -> bool:
        return self._entry.pop(key, None) is not None

    def pop(self, can_evict: Callable[[Key], bool]) -> Key | None:
        """Remove and return the lowest-priority evictable leaf, or None if there is none."""
        heap, entries, is_leaf = self._heap, self._entry, self._policy.is_leaf
        kept: list[tuple[float, int, Key]] = []
        found = None
        while heap:
            item = heap[0]
            entry = entries.get(item[2])
            if entry is None or entry[1] != item[1] or not is_leaf(item[2]):
                heapq.heappop(heap)  # stale, or no longer a leaf (re-pushed when it is one again)
                continue
            heapq.heappop(heap)
            if can_evict(item[2]):
                found = item[2]
                break
            kept.append(item)  # pinned: keep it for later
        for item in kept:
            heapq.heappush(heap, item)
        if found is not None:
            self.last_priority = entries.pop(found)[0]
        return found

    def pop_any(self, can_evict: Callable[[Key], bool]) -> Key | None:
        """Lowest-priority evictable key, leaf or not: the rare fallback when no leaf may go. O(n)."""
        best = None
        for key, (priority, _) in self._entry.items():
            if (best is None or priority < best[0]) and can_evict(key):
                best = (priority, key)
        if best is None:
            return None
        del self._entry[best[1]]
        self.last_priority = best[0]
        return best[1]

    def _compact(self) -> None:
        is_leaf = self._policy.is_leaf
        self._heap = [(p, s, k) for k, (p, s) in self._entry.items() if is_leaf(k)]
        heapq.heapify(self._heap)


class _ChainClock:
    """Recency stamps that keep a chain's tail older than its head.

    Chunks inserted or touched together (one request's chain) share a tick, and a deeper chunk
    gets a lower stamp within the tick, so "oldest first" meets tails before heads.
    """

    __slots__ = ("tick", "_last")

    def __init__(self) -> None:
        self.tick = 0
        self._last: Key | None = None

    def on_insert(self, key: Key, parent: Key | None, depth: int) -> float:
        if parent is None or parent != self._last:
            self.tick += 1
        self._last = key
        return self.tick * _DEPTH_SPAN - min(depth, _DEPTH_SPAN - 1)

    def on_touch(self, last: Key) -> int:
        self.tick += 1
        self._last = last
        return self.tick

    @staticmethod
    def stamp(tick: int, depth: int) -> float:
        return tick * _DEPTH_SPAN - min(depth, _DEPTH_SPAN - 1)


_DEPTH_SPAN = 1 << 20


class _QueuedPolicy(EvictionPolicy):
    """Shared plumbing: depths, a chain clock, and leaf queues told when a key becomes a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self._depth: dict[Key, int] = {}
        self._clock = _ChainClock()
        self._queues: tuple[_LeafQueue, ...] = ()
        self._capacity = 0  # largest resident count seen at an eviction: the tier's size

    def _became_leaf(self, key: Key) -> None:
        for queue in self._queues:
            if key in queue:
                queue.became_leaf(key)
                return

    def _queue_of(self, key: Key) -> _LeafQueue | None:
        for queue in self._queues:
            if key in queue:
                return queue
        return None

    def _forget(self, key: Key) -> None:
        self._unlink(key)
        self._depth.pop(key, None)

    def remove(self, key: Key) -> None:
        queue = self._queue_of(key)
        if queue is not None:
            queue.discard(key)
            self._forget(key)

    def _observe_capacity(self) -> int:
        if len(self) > self._capacity:
            self._capacity = len(self)
        return self._capacity

    def _fallback(self, can_evict: Callable[[Key], bool]) -> Key | None:
        for queue in self._queues:
            victim = queue.pop_any(can_evict)
            if victim is not None:
                return victim
        return None


class LRUPolicy(_QueuedPolicy):
    """Least recently used, among leaves first; hits touch tail-first.

    The oldest evictable leaf by last use, else the oldest evictable chunk: the order
    _pick_from_order gives on a recency list, kept in a leaf queue because parents that stop
    being hit (their children are) pile up at the old end and would be scanned every time.
    """

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order = _LeafQueue(self)
        self._queues = (self._order,)
        self._used = 0

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        self._used += 1
        if key not in self._order:
            self._link(key, parent)
        self._order.set(key, self._used)

    def touch(self, keys: Sequence[Key]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                self._used += 1
                order.set(key, self._used)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        victim = self._order.pop(can_evict)
        if victim is None:
            victim = self._order.pop_any(can_evict)
        if victim is not None:
            self._forget(victim)
        return victim


class FIFOPolicy(LRUPolicy):
    """First in, first out (UCM's DRAM tier); hits do not reorder."""

    name = "fifo"

    def touch(self, keys: Sequence[Key]) -> None:
        return None


class ARCPolicy(_QueuedPolicy):
    """Adaptive Replacement Cache (Megiddo and Modha, FAST'03), leaves first.

    T1 holds chunks seen once recently, T2 chunks seen at least twice; B1 and B2 remember keys
    evicted from each. A hit in B1 grows T1's target share p, a hit in B2 shrinks it. The
    capacity c is learned as the largest resident count at an eviction (the tier evicts only
    when full). The chunk about to come in is known from `admit`, which a tier calls first.
    """

    name = "arc"

    def __init__(self) -> None:
        super().__init__()
        self._t1 = _LeafQueue(self)
        self._t2 = _LeafQueue(self)
        self._queues = (self._t1, self._t2)
        self._b1: OrderedDict[Key, None] = OrderedDict()
        self._b2: OrderedDict[Key, None] = OrderedDict()
        self._p = 0.0
        self._incoming: Key | None = None

    def admit(self, key: Key, parent: Key | None, depth: int) -> bool:
        self._incoming = key
        c = max(self._capacity, len(self), 1)
        if key in self._b1:
            self._p = min(float(c), self._p + max(len(self._b2) / len(self._b1), 1.0))
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))
        return True

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        stamp = self._clock.on_insert(key, parent, depth)
        queue = self._queue_of(key)
        if queue is not None:  # re-inserted while cached: counts as a hit
            queue.discard(key)
            self._t2.set(key, stamp)
            return
        self._link(key, parent)
        self._depth[key] = depth
        if self._b1.pop(key, 0) is None or self._b2.pop(key, 0) is None:
            self._t2.set(key, stamp)
        else:
            self._t1.set(key, stamp)
        self._incoming = None
        self._trim_ghosts()

    def touch(self, keys: Sequence[Key]) -> None:
        if not keys:
            return
        tick = self._clock.on_touch(keys[-1])
        t1, t2, depth = self._t1, self._t2, self._depth
        for key in keys:
            if t1.discard(key) or key in t2:
                t2.set(key, _ChainClock.stamp(tick, depth[key]))

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        self._observe_capacity()
        n1 = len(self._t1)
        from_t1 = n1 > 0 and (n1 > self._p or (self._incoming in self._b2 and n1 >= self._p))
        first, second = (self._t1, self._t2) if from_t1 else (self._t2, self._t1)
        victim = first.pop(can_evict)
        queue = first
        if victim is None:
            victim, queue = second.pop(can_evict), second
        if victim is None:
            victim = self._fallback(can_evict)
            queue = self._t1 if victim is not None and victim not in self._t2 else self._t2
        if victim is None:
            return None
        (self._b1 if queue is self._t1 else self._b2)[victim] = None
        self._forget(victim)
        self._trim_ghosts()
        return victim

    def _trim_ghosts(self) -> None:
        c = max(self._capacity, len(self), 1)
        b1, b2 = self._b1, self._b2
        while b1 and len(self._t1) + len(b1) > c:
            b1.popitem(last=False)
        while b2 and len(self) + len(b1) + len(b2) > 2 * c:
            b2.popitem(last=False)


class S3FIFOPolicy(_QueuedPolicy):
    """S3-FIFO (Yang et al., SOSP'23), leaves first.

    New chunks enter a small FIFO S (10% of the capacity); one leaving S that was hit while
    there moves to the main FIFO M, otherwise it is evicted and its key kept in a ghost FIFO G.
    A chunk whose key is in G enters M directly. M is a CLOCK: a chunk at M's head with a
    non-zero hit count (capped at 3) goes back to M's tail with the count lowered by one.
    """

    name = "s3fifo"
    small_fraction = 0.1
    max_freq = 3

    def __init__(self) -> None:
        super().__init__()
        self._small = _LeafQueue(self)
        self._main = _LeafQueue(self)
        self._queues = (self._small, self._main)
        self._freq: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        stamp = self._clock.on_insert(key, parent, depth)
        if key in self._freq:
            self._bump(key)
            return
        self._link(key, parent)
        self._depth[key] = depth
        self._freq[key] = 0
        if self._ghost.pop(key, 0) is None:
            self._main.set(key, stamp)
        else:
            self._small.set(key, stamp)

    def _bump(self, key: Key) -> None:
        freq = self._freq
        if freq[key] < self.max_freq:
            freq[key] += 1

    def touch(self, keys: Sequence[Key]) -> None:
        freq = self._freq
        for key in keys:
            if key in freq:
                self._bump(key)

    def _forget(self, key: Key) -> None:
        super()._forget(key)
        self._freq.pop(key, None)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        capacity = self._observe_capacity()
        small, main, freq, depth = self._small, self._main, self._freq, self._depth
        # each chunk moves from S to M once and loses one hit count per pass through M, so
        # this loop ends within (S moves + 3 x M) rounds
        for _ in range(len(small) + (self.max_freq + 1) * len(main) + 1):
            if small and (len(small) >= self.small_fraction * capacity or not main):
                key = small.pop(can_evict)
                if key is not None:
                    if freq[key] > 0:
                        freq[key] = 0
                        main.set(key, _ChainClock.stamp(self._clock.tick, depth[key]))
                        continue
                    self._ghost[key] = None
                    while len(self._ghost) > max(capacity, 1):
                        self._ghost.popitem(last=False)
                    self._forget(key)
                    return key
            key = main.pop(can_evict)
            if key is None:
                key = small.pop(can_evict)
                if key is None:
                    break
            if freq[key] > 0:
                freq[key] -= 1
                main.set(key, _ChainClock.stamp(self._clock.tick, depth[key]))
                continue
            self._forget(key)
            return key
        victim = self._fallback(can_evict)
        if victim is not None:
            self._forget(victim)
        return victim


def _log2_add(a: float, b: float) -> float:
    """log2(2**a + 2**b) without overflow."""
    if a < b:
        a, b = b, a
    return a + math.log2(1.0 + 2.0 ** (b - a))


class LRFUPolicy(_QueuedPolicy):
    """Least recently/frequently used with a ghost history, leaves first.

    Each access adds a weight that halves every `half_life` cache turnovers (a turnover is as
    many inserts as the cache holds), and the chunk with the least total weight goes first
    (LRFU, Lee et al. 1999; the score is kept as log2 of the weights so it never overflows
    and stays fixed between accesses). Recent and repeated use both protect a chunk.
    An evicted chunk's score is kept in a ghost list (`ghost_factor` x capacity keys) and
    restored if the chunk comes back, so a chunk reused at a distance longer than the cache's
    reach still earns its frequency. A chunk's accesses include all of its children's, so a
    parent seldom scores below its child (and the leaf queue never takes it first anyway);
    `depth_weight` lowers a chunk's score by that much per level, so tails go before heads;
    `require_parent` refuses a chunk whose parent is not cached.
    """

    name = "lrfu"

    def __init__(self, *, half_life: float = 2.0, ghost_factor: float = 4.0, depth_weight: float = 0.0,
                 require_parent: bool = False) -> None:
        super().__init__()
        self.require_parent = require_parent
        self.half_life = half_life
        self.ghost_factor = ghost_factor
        self.depth_weight = depth_weight
        self._score: dict[Key, float] = {}
        self._queue = _LeafQueue(self)
        self._queues = (self._queue,)
        self._ghost: OrderedDict[Key, float] = OrderedDict()
        self._inserts = 0
        self._now = 0.0
        self._last: Key | None = None

    def admit(self, key: Key, parent: Key | None, depth: int) -> bool:
        # a chunk whose parent is not cached cannot be found by a prefix lookup; refusing it
        # suits a lone tier, not a disk fed by demotion (a DRAM tier demotes tails first)
        return not self.require_parent or depth == 0 or parent in self

    def _advance(self) -> float:
        c = max(self._capacity, len(self), 1)
        self._now = self._inserts / (c * self.half_life)
        return self._now

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        now = self._advance() if parent is None or parent != self._last else self._now
        self._last = key
        self._inserts += 1
        queue = self._queue
        if key in queue:
            self._access(key, now)
            return
        self._link(key, parent)
        self._depth[key] = depth
        past = self._ghost.pop(key, None)
        self._score[key] = score = now if past is None else _log2_add(past, now)
        queue.set(key, score - self.depth_weight * depth)

    def _forget(self, key: Key) -> None:
        super()._forget(key)
        self._score.pop(key, None)

    def _access(self, key: Key, now: float) -> None:
        self._score[key] = score = _log2_add(self._score[key], now)
        self._queue.set(key, score - self.depth_weight * self._depth[key])

    def touch(self, keys: Sequence[Key]) -> None:
        if not keys:
            return
        now = self._advance()
        self._last = keys[-1]
        queue = self._queue
        for key in reversed(keys):
            if key in queue:
                self._access(key, now)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        capacity = self._observe_capacity()
        queue = self._queue
        victim = queue.pop(can_evict)
        if victim is None:
            victim = queue.pop_any(can_evict)
        if victim is None:
            return None
        ghost = self._ghost
        ghost[victim] = self._score[victim]
        while len(ghost) > self.ghost_factor * capacity:
            ghost.popitem(last=False)
        self._forget(victim)
        return victim


Profile = tuple[float, ...]


def _shift(profile: Profile, uses: int) -> float:
    """Priority shift, in cache sizes, of a chunk used `uses` times (the last entry covers the rest)."""
    return profile[min(uses, len(profile)) - 1]


class _MiniCache:
    """A metadata-only cache of `capacity` keys, ranked as AdaptiveLRUPolicy ranks with a fixed
    profile; it sees a hash-sampled share of the references, one key at a time (no parent links,
    so no prefix rule). A miniature simulation (Waldspurger et al., ATC'17): its hit count
    estimates how the full cache would do with that profile, at a fraction of the cost.
    """

    __slots__ = ("profile", "ghost_factor", "capacity", "tick", "hits", "_heap", "_stamp", "_uses", "_ghost")

    def __init__(self, profile: Profile, ghost_factor: float) -> None:
        self.profile = profile
        self.ghost_factor = ghost_factor
        self.capacity = 0  # 0 until the real tier's size is known: no evictions before
        self.tick = 0
        self.hits = 0
        self._heap: list[tuple[float, int, Key]] = []
        self._stamp: dict[Key, int] = {}  # key -> tick of its live heap entry
        self._uses: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, int] = OrderedDict()

    def access(self, key: Key) -> None:
        self.tick += 1
        uses = self._uses.get(key)
        if uses is None:
            uses = self._ghost.pop(key, 0) + 1
        else:
            self.hits += 1
            uses += 1
        self._uses[key] = uses
        self._stamp[key] = self.tick
        heapq.heappush(self._heap, (self.tick + _shift(self.profile, uses) * self.capacity, self.tick, key))
        capacity = self.capacity
        if capacity:
            heap, stamp, ghost, all_uses = self._heap, self._stamp, self._ghost, self._uses
            while len(all_uses) > capacity:
                _, tick, victim = heapq.heappop(heap)
                if stamp.get(victim) != tick:
                    continue  # stale entry
                del stamp[victim]
                ghost[victim] = all_uses.pop(victim)
                if len(ghost) > self.ghost_factor * capacity:
                    ghost.popitem(last=False)
            if len(heap) > 2 * len(stamp) + 64:
                self._heap = [(p, t, k) for p, t, k in heap if stamp.get(k) == t]
                heapq.heapify(self._heap)


class AdaptiveLRUPolicy(_QueuedPolicy):
    """LRU whose order also weighs how often a chunk was used, by an amount tuned online.

    A chunk's priority is its last use (a counter, as in LRU) plus `profile[uses - 1]` cache
    sizes, where `uses` counts its uses (remembered for `ghost_factor` x capacity evicted keys
    too) and the profile's last entry covers every higher count. The profile (0,) is exactly LRU;
    (-0.5, 0.5, 1.0) enters a chunk seen once half a cache older than LRU would and keeps one
    seen three times a whole cache longer. On the Mooncake conversation trace most chunks are
    never used again (a prompt's last, partial block; conversations that end) while a chunk used
    twice is likely to be used again, so weighing uses helps while the cache holds only minutes
    of requests, and costs a little once it holds most of the reuse (where LRU is near Belady).

    The profile is therefore chosen online among `profiles` (by default LRU, a mild profile, and
    a strong one that keeps a chunk used twice for three caches' worth of uses and lets a chunk
    seen once go almost at once, the best of those tried at 1-2% capacity on that trace): one
    miniature cache per profile replays the references of a 1-in-2**sample_shift hash sample of
    the keys at that share of the capacity; every `window` sampled references the policy takes
    the profile whose hit count (older windows weighted down by `decay` each) is best, leaving
    the first profile (LRU by default) only for a lead of `margin`. With `profile` given, it is
    fixed and no miniature cache runs. The miniature caches see single keys, not chains, so they
    misjudge a little where the prefix rule bites; the margin keeps LRU where it is close.
    """

    name = "adaptive"
    default_profiles: ClassVar[tuple[Profile, ...]] = ((0.0,), (-0.3, 0.5, 1.0, 1.5, 2.0), (-0.99, 3.0, 6.0, 9.0, 12.0))

    def __init__(self, *, profile: Profile | None = None, profiles: Sequence[Profile] | None = None,
                 sample_shift: int = 3, window: int = 512, decay: float = 0.9, margin: float = 0.05,
                 ghost_factor: float = 4.0) -> None:
        super().__init__()
        self._order = _LeafQueue(self)
        self._queues = (self._order,)
        self._used = 0
        self._uses: dict[Key, int] = {}
        self._ghost: OrderedDict[Key, int] = OrderedDict()
        self.ghost_factor = ghost_factor
        candidates = tuple(profiles) if profiles is not None else self.default_profiles
        self.profile: Profile = profile if profile is not None else candidates[0]
        self.window = window
        self.decay = decay
        self.margin = margin
        self._mask = (1 << sample_shift) - 1
        self._sample_shift = sample_shift
        self._minis = [] if profile is not None else [_MiniCache(p, ghost_factor) for p in candidates]
        self._scores = [0.0] * len(self._minis)
        self._last_hits = [0] * len(self._minis)
        self._sampled = 0
        self._sampled_hits = 0  # sampled references that found their chunk resident in this tier
        self._observing = bool(self._minis)  # whether insert and touch call _sample

    # -- online tuning --------------------------------------------------------------------------
    def _sample(self, key: Key, resident: bool) -> None:
        """One reference to `key` (`resident`: it was cached); fed to the miniature caches if sampled."""
        if zlib.crc32(key) & self._mask:
            return
        for mini in self._minis:
            mini.access(key)
        self._sampled += 1
        self._sampled_hits += resident
        if self._sampled % self.window == 0:
            self._choose()

    def _choose(self) -> None:
        scores = self._scores
        for i, mini in enumerate(self._minis):
            scores[i] = self.decay * scores[i] + (mini.hits - self._last_hits[i])
            self._last_hits[i] = mini.hits
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if scores[best] <= (1.0 + self.margin) * scores[0]:
            best = 0
        self.profile = self._minis[best].profile

    # -- the protocol ---------------------------------------------------------------------------
    def _rank(self, key: Key, uses: int) -> None:
        """File a use of `key`, its `uses`-th: a new last-use stamp, shifted by the profile."""
        self._used += 1
        shift = _shift(self.profile, uses)
        self._order.set(key, self._used + shift * max(self._capacity, len(self)) if shift else self._used)

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        uses = self._uses.get(key)
        if self._observing:
            self._sample(key, uses is not None)
        if uses is None:
            self._link(key, parent)
            uses = self._ghost.pop(key, 0) + 1
        else:
            uses += 1  # re-inserted while cached: a use
        self._uses[key] = uses
        self._rank(key, uses)

    def touch(self, keys: Sequence[Key]) -> None:
        order, all_uses = self._order, self._uses
        for key in reversed(keys):
            if key in order:
                if self._observing:
                    self._sample(key, True)
                uses = all_uses[key] + 1
                all_uses[key] = uses
                self._rank(key, uses)

    def _forget(self, key: Key) -> None:
        super()._forget(key)
        self._uses.pop(key, None)

    def _pop_victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
        victim = self._order.pop(can_evict)
        if victim is None:
            victim = self._order.pop_any(can_evict)
        return victim

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        before = self._capacity
        capacity = self._observe_capacity()
        if capacity != before:
            for mini in self._minis:
                mini.capacity = max(1, capacity >> self._sample_shift)
        victim = self._pop_victim(can_evict)
        if victim is None:
            return None
        ghost = self._ghost
        ghost[victim] = self._uses[victim]
        while len(ghost) > self.ghost_factor * capacity:
            ghost.popitem(last=False)
        self._forget(victim)
        return victim


LRU_PROFILE: Profile = (0.0,)


@dataclass(slots=True)
class LRUGuard:
    """Decides, a few references at a time, whether a policy may rank chunks its own way or must
    evict in exact LRU order, from the policy's real hits and an LRU shadow's on the same references.

    Amounts are in units: an LRU shadow's hits over `unit` references (its hit rate is a moving
    average), so the guard means the same on any trace. While the policy ranks its own way,
    `surplus` adds up its hits minus the shadow's, capped at `credit` units (an old lead buys only
    so much later loss). When the surplus falls below -`slack` units the guard trips: the policy
    evicts in LRU order for `hold` units of references, times `growth` at each trip in a row (at
    most `max_hold`), after which the surplus starts again from zero. A surplus that reaches its
    cap resets the count of trips.

    So a stretch of the policy's own ranking ends at most `slack` units (plus one `update`'s
    references) behind LRU, and n trips in a row take at least hold x growth**(n-1) units: however
    badly the policy misjudges, the loss it can be charged grows with the log of the references,
    not with the references. What it cannot see is damage that shows only later (a chunk evicted
    while the policy ranked its own way, missed after the trip); on the generated traces, a ranking
    that loses a third of LRU's hits when left alone ends within 2-3% of LRU behind this guard.
    References already ranked in LRU order (the policy chose LRU itself, or a hold) leave the
    surplus alone: they are LRU but for the shadow's small differences from the real tier (no chain
    rule, no pinning). Defaults: trip a quarter of a unit's worth of LRU hits behind, hold 2, 8, 32,
    64 units. A smaller slack bounds a bad ranking tighter (0.1: within about 1% on the generated
    traces) but also trips on the short bursts where LRU does better on the Mooncake trace before
    frequency pays off, and gave up a third of the gain there at 2% capacity.
    """

    slack: float = 0.25
    credit: float = 1.0
    hold: float = 2.0
    growth: float = 4.0
    max_hold: float = 64.0
    unit: int = 4096
    surplus: float = 0.0
    trips: int = 0
    held: float = 0.0  # references left in LRU order
    _shadow_rate: float = field(default=0.0, init=False, repr=False)  # shadow hits per reference, recent mean
    _seen: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.slack >= 0 and self.credit >= 0 and 0 < self.hold <= self.max_hold and self.unit >= 1):
            raise ValueError("LRUGuard needs slack >= 0, credit >= 0, 0 < hold <= max_hold and unit >= 1, got "
                             f"slack={self.slack}, credit={self.credit}, hold={self.hold}, "
                             f"max_hold={self.max_hold}, unit={self.unit}")

    @property
    def holding(self) -> bool:
        return self.held > 0

    def update(self, refs: int, hits: int, shadow_hits: int, ranked_own_way: bool) -> bool:
        """Account `refs` references: the policy's `hits` on them and the LRU shadow's, and whether
        the policy ranked its own way meanwhile. True if it may rank its own way next."""
        if refs <= 0:
            return not self.held
        self._seen += refs
        weight = refs / min(self._seen, 4 * self.unit)  # a running mean over the last few units
        self._shadow_rate += weight * (shadow_hits / refs - self._shadow_rate)
        scale = max(self._shadow_rate * self.unit, 1.0)
        if self.held:
            self.held = max(0.0, self.held - refs)
            if self.held:
                return False
            self.surplus = 0.0
            return True
        if ranked_own_way:
            surplus = self.surplus + hits - shadow_hits
            if surplus >= self.credit * scale:
                surplus = self.credit * scale
                self.trips = 0
            elif surplus < -self.slack * scale:
                self.held = min(self.hold * self.growth ** self.trips, self.max_hold) * self.unit
                self.trips += 1
                self.surplus = surplus
                return False
            self.surplus = surplus
        return True


class GuardedAdaptivePolicy(AdaptiveLRUPolicy):
    """`adaptive` behind an LRUGuard, so it never trails LRU by more than the guard's slack. The default.

    `adaptive` trusts miniature caches that see single keys on a sample and each run one profile
    from the start, while the real tier follows the chain rule and carries the priorities of
    profiles it has left (a chunk raised by 12 cache sizes keeps them after a switch to LRU):
    either can make it trail LRU on traffic it was not tuned on. This policy therefore also keeps
    (1) every chunk's plain last use in a second leaf queue, and evicts from that queue, in exact
    LRU order whatever the priorities say, whenever the chosen profile is LRU or the guard holds
    it to LRU; and (2) an LRU shadow: the keys of the last `capacity` references, metadata only, on
    the references of a 1-in-2**shadow_shift hash sample of the keys (by default all: one ordered
    dict entry per cached chunk, against the policy's several). Every `step` references the guard
    compares what the tier really found resident with what the shadow found, on the same references.
    `profile` fixes the ranking (then only the guard adapts).
    """

    name = "guarded"

    def __init__(self, *, guard: LRUGuard | None = None, shadow_shift: int = 0, step: int = 64,
                 **adaptive: Any) -> None:
        super().__init__(**adaptive)
        if self._minis and self._minis[0].profile != LRU_PROFILE:
            raise ValueError(f"the first candidate profile must be LRU {LRU_PROFILE}, got {self._minis[0].profile}")
        self.guard = guard if guard is not None else LRUGuard()
        self._recency = _LeafQueue(self)  # plain last-use stamps: exact LRU order
        self._queues = (self._order, self._recency)
        self._lru_order = True  # adaptive starts as LRU
        self._shadow: OrderedDict[Key, None] = OrderedDict()
        self._shadow_mask = (1 << shadow_shift) - 1
        self._shadow_shift = shadow_shift
        self._step = step
        self._counts = [0, 0, 0]  # references, own hits, shadow hits since the last guard update
        self._observing = True

    @property
    def ranking(self) -> str:
        """'lru' while evicting in exact LRU order, else the profile in force."""
        return "lru" if self._lru_order else f"profile {self.profile}"

    def _sample(self, key: Key, resident: bool) -> None:
        if not (self._shadow_mask and zlib.crc32(key) & self._shadow_mask):
            counts, shadow = self._counts, self._shadow
            counts[0] += 1
            counts[1] += resident
            if key in shadow:
                counts[2] += 1
                shadow.move_to_end(key)
            else:
                shadow[key] = None
                room = self._capacity >> self._shadow_shift
                if room and len(shadow) > room:
                    shadow.popitem(last=False)
            if counts[0] >= self._step:
                self._update_guard()
        if self._minis:
            super()._sample(key, resident)

    def _update_guard(self) -> None:
        refs, hits, shadow_hits = self._counts
        self._counts = [0, 0, 0]
        may = self.guard.update(refs, hits, shadow_hits, not self._lru_order)
        self._lru_order = not may or self.profile == LRU_PROFILE

    def _choose(self) -> None:
        super()._choose()
        self._lru_order = self.guard.holding or self.profile == LRU_PROFILE

    def _rank(self, key: Key, uses: int) -> None:
        super()._rank(key, uses)
        self._recency.set(key, self._used)

    def _became_leaf(self, key: Key) -> None:
        if key in self._order:
            self._order.became_leaf(key)
            self._recency.became_leaf(key)

    def remove(self, key: Key) -> None:
        if self._order.discard(key):
            self._recency.discard(key)
            self._forget(key)

    def _pop_victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
        first, other = (self._recency, self._order) if self._lru_order else (self._order, self._recency)
        victim = first.pop(can_evict)
        if victim is None:
            victim = first.pop_any(can_evict)
        if victim is not None:
            other.discard(victim)
        return victim


POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    POLICIES[cls.name] = cls
    return cls


for _cls in (LRUPolicy, FIFOPolicy, ARCPolicy, S3FIFOPolicy, LRFUPolicy, AdaptiveLRUPolicy, GuardedAdaptivePolicy):
    register_policy(_cls)


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"eviction policy {name!r} is unknown; choose one of {sorted(POLICIES)}") from None
