"""StoreHost: leases, load pins and save reservations over one TieredStore, per owner.

Who calls: the store service (one owner per client connection, from that connection's
thread) and the in-process client (one owner). Everything an owner holds (lease pins,
pins of loads in progress, reserved slots of unfinished saves) is listed under it, so
`drop_owner` returns it all when a client disconnects or dies.

    lookup(owner, keys, lease, lease_s)       leading hits and tiers; optionally lease them
    lease(owner, keys, lease_s)               lease exactly these keys (all must exist)
    release(lease_id)                         LeaseError if not held
    trim(lease_id, keys)                      drop these keys from a lease, keep the rest
    renew_leases(lease_ids, lease_s)          hold those still held lease_s from now (the vLLM scheduler
                                              keeps the leases of loads it shipped alive); the ids renewed
    load_begin(owner, keys, lease_id, hold_s) pin each chunk in DRAM (promoting disk hits)
    load_end(owner, load_id, corrupt)         unpin; drop chunks the client found corrupt
    allocate(owner, keys, parent, depth, hold_s) reserve DRAM slots for a chain
    renew_save(owner, save_id, hold_s)        hold those slots hold_s from now (a live client's long save)
    commit(owner, save_id) / abort(...)       publish in chain order, then disk in background
    take_disk_errors(owner, wait)             failed disk writes of the owner's saves, once each
    flush(timeout_s)                          until every disk write queued so far has ended
                                              (FlushTimeoutError past the bound)
    wait_lower(keys, timeout_s)               until saves of these keys are committed (or aborted)
                                              and their lower-tier writes have ended
    expire(now), drop_owner(owner)
    interrupt_waits()                         the service is stopping: flush and wait_lower return now

A lease pins DRAM hits at once; a disk hit is promoted into DRAM by a background thread
and pinned there, so the later load copies from DRAM. Leased chunks cannot be evicted
until the lease is released, expires, or its owner disconnects. A load that names a lease
no longer held pins whatever chunks are still stored, by key: a slot reused meanwhile holds
another key, so a chunk evicted after its lease ended is a miss, never another chunk's bytes.

A load's pins and a save's reserved slots are bounded like a lease (`hold_s`, at most
max_lease_s): a client that stops (SIGSTOP, a stuck engine) while keeping its connection
open would otherwise pin the pool for good. `expire` returns them; the client, which
stops trusting them a margin before that bound (service_client.py), then gets "unknown_load" /
"unknown_save" and reports those chunks as failed.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvtier.core import metrics as m
from kvtier.core.errors import ConfigError
from kvtier.service.protocol import FlushTimeoutError, LeaseError, ServiceError
from kvtier.store.tiered import SaveResult, TieredStore
from kvtier.store.transfer import TransferHandle
from kvtier.tiers.base import ChunkMeta
from kvtier.tiers.memory import ChunkEntry, MemoryTier, Reservation

OwnerId = int
LeaseId = int
NO_SLOT = -1
DEFAULT_HOLD_S = 30.0  # how long a load's pins / a save's slots are held when the client names no bound
# wait_lower waits for the store's lower-tier writes in slices this long, so that a stopping
# service's interrupt_waits reaches it (TieredStore.wait_lower cannot be woken)
_WAKE_S = 0.25


@dataclass(slots=True)
class _Lease:
    owner: OwnerId
    deadline: float
    pinned: list[ChunkEntry] = field(default_factory=list)  # DRAM hits, each pinned once
    promotions: dict[bytes, Future[ChunkEntry | None]] = field(default_factory=dict)  # disk hits: key -> its promotion


@dataclass(slots=True)
class _Load:
    owner: OwnerId
    keys: list[bytes]
    entries: list[ChunkEntry | None]  # per key, the entry pinned for it (None: not served)
    deadline: float = float("inf")
    started: float = 0.0  # perf_counter at load_begin: the memory tier's load latency ends at load_end


@dataclass(slots=True)
class _Save:
    owner: OwnerId
    keys: list[bytes]
    parent: bytes
    first_depth: int
    reservations: list[Reservation | None]  # None: already stored (skip) or beyond `granted`
    granted: int
    deadline: float = float("inf")


@dataclass(slots=True, frozen=True)
class LoadPins:
    load_id: int
    slots: list[int]  # NO_SLOT for a chunk that could not be pinned
    tiers: list[str]  # where each chunk was found ("" when failed)
    checksums: list[tuple[int, ...]]  # per chunk, every layer (empty when failed)
    hold_s: float = DEFAULT_HOLD_S  # the pins are returned this long after load_begin


@dataclass(slots=True, frozen=True)
class Allocation:
    save_id: int
    slots: list[int]  # NO_SLOT: already stored (do not write) or not granted
    granted: int  # chunks past this index got no room and will not be saved
    hold_s: float = DEFAULT_HOLD_S  # the slots are returned this long after allocate unless committed


class StoreHost:
    def __init__(self, store: TieredStore, *, max_lease_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if store.memory is None:
            raise ConfigError("the store service needs a memory tier (store.memory)")
        self.store = store
        self.memory: MemoryTier = store.memory
        self.max_lease_s = max_lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[LeaseId, _Lease] = {}
        self._loads: dict[int, _Load] = {}
        self._saves: dict[int, _Save] = {}
        # keys of saves allocated and not yet committed (to the point of queuing their lower-tier
        # writes) or aborted
        self._saving: Counter[bytes] = Counter()
        # notified when a save ends (wait_lower), a flush ends (flush), or interrupt_waits is called
        self._waiters = threading.Condition(self._lock)
        self._interrupted = threading.Event()  # the service is stopping: waits return at once
        # store.flush bounds each write's wait, not the whole: it runs on its own thread and a
        # flush request waits for it with its own deadline. A flush queued and not yet started is
        # shared by later requests (it covers their writes too), so a hung disk parks at most two.
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="kvtier-flush")
        self._queued_flush: Future[None] | None = None
        self._writes: dict[OwnerId, list[tuple[int, TransferHandle[SaveResult]]]] = {}  # disk writes of saves
        self._ids = itertools.count(1)
        self._promoter = ThreadPoolExecutor(max(2, store.config.io_threads), thread_name_prefix="kvtier-promote")
        # The DRAM tier's series, looked up once: a lookup or load records a few numbers per
        # batch through these handles, never a label lookup (let alone anything per chunk).
        metrics, mem = store.metrics, self.memory.name
        self._timed_tiers = frozenset(t.name for t in store.tiers)
        self._mem_lookup_latency = metrics.histogram(m.LOOKUP_LATENCY, tier=mem)
        self._mem_load_latency = metrics.histogram(m.LOAD_LATENCY, tier=mem)
        self._mem_hits = metrics.counter(m.HITS, tier=mem)
        self._mem_misses = metrics.counter(m.MISSES, tier=mem)
        self._mem_bytes_read = metrics.counter(m.BYTES_READ, tier=mem)
        self._mem_served_tokens = metrics.counter(m.SERVED_TOKENS, tier=mem)

    # -- lookup and leases -------------------------------------------------------------
    def lookup(self, owner: OwnerId, keys: Sequence[bytes], lease: bool = False,
               lease_s: float = 30.0) -> tuple[int, list[str], LeaseId | None]:
        mem, disk = self.memory, self.store.disk
        tiers: list[str] = []
        held = _Lease(owner, self._clock() + min(lease_s, self.max_lease_s))
        lower_at: dict[int, str] = {}  # index -> lower tier, for runs the lower tiers hold
        # Lower tiers time their own batched lookups (store.lookup_lower). DRAM's run is tracked in a
        # local flag, so a DRAM hit costs one test of it and no clock read; a batch DRAM answers whole
        # (the common case) reads the clock twice and makes one observation, and only a batch that
        # reaches the tiers below builds a RunTimer.
        started = time.perf_counter()
        timer: m.RunTimer | None = None
        memory_run = True
        for i, key in enumerate(keys):
            if lease:
                entry = mem.pin_entry(key)
                if entry is not None:
                    held.pinned.append(entry)
                    tiers.append("memory")
                    if not memory_run:
                        assert timer is not None
                        timer.switch(mem.name)
                        memory_run = True
                    continue
            elif mem.contains(key):
                tiers.append("memory")
                if not memory_run:
                    assert timer is not None
                    timer.switch(mem.name)
                    memory_run = True
                continue
            memory_run = False
            if timer is None:  # DRAM's run so far counts from `started`
                timer = m.RunTimer(self.store.metrics, m.LOOKUP_LATENCY, self._timed_tiers, mem.name, started)
            if disk is not None and disk.contains(key):
                tiers.append("disk")
                if timer.tier != disk.name:
                    timer.switch(disk.name)
                if lease and key not in held.promotions:  # (a key twice in one lookup: promoted once)
                    held.promotions[key] = self._promoter.submit(self._promote_pin, key)
                continue
            timer.pause()  # lower tiers time their own batched lookups
            if i not in lower_at and self.store.lower_tiers:  # one batched lookup per run
                ended = lower_at.get(i - 1)  # a run that ended just before i: its tier lacks keys[i]
                lower_at.update(enumerate(self.store.lookup_lower(keys, i, (ended,) if ended else ()), start=i))
            if i in lower_at:
                tiers.append(lower_at[i])
                if lease and key not in held.promotions:  # (a key twice in one lookup: promoted once)
                    held.promotions[key] = self._promoter.submit(self._promote_pin, key)
                continue
            break
        if timer is None:
            self._mem_lookup_latency.observe(time.perf_counter() - started)
        else:
            timer.observe()
        self._touch(keys[: len(tiers)], tiers)
        if not lease or not tiers:
            return len(tiers), tiers, None
        return len(tiers), tiers, self._add_lease(held)

    def lease(self, owner: OwnerId, keys: Sequence[bytes], lease_s: float = 30.0) -> LeaseId:
        """Lease exactly `keys`; ServiceError("unknown_key") and nothing leased if one is absent."""
        hits, _tiers, lease_id = self.lookup(owner, keys, True, lease_s)
        if hits < len(keys):
            if lease_id is not None:
                self.release(lease_id)
            raise ServiceError("unknown_key", f"cannot lease key {hits}: it is not stored")
        assert lease_id is not None or not keys
        return lease_id if lease_id is not None else self._add_lease(_Lease(owner, self._clock()))

    def release(self, lease_id: LeaseId) -> None:
        with self._lock:
            held = self._leases.pop(lease_id, None)
        if held is None:
            raise LeaseError(f"lease {lease_id} is not held (released, expired, or never taken)")
        self._unpin_lease(held)

    def trim(self, lease_id: LeaseId, keys: Sequence[bytes]) -> int:
        """Drop `keys` from a lease and keep the rest: their DRAM pins end, and their disk
        promotions not started are cancelled (one under way unpins its chunk when it ends), as
        release() does for a whole lease. The vLLM scheduler trims the hits its load planner
        chose to recompute, so their reads stop taking the disk from loads that pay. A key the
        lease does not hold is ignored. Returns how many of the lease's pins and promotions ended."""
        drop = set(keys)
        with self._lock:
            held = self._leases.get(lease_id)
            if held is None:
                raise LeaseError(f"lease {lease_id} is not held (released, expired, or never taken)")
            # new containers, not edits in place: wait_lease reads a lease's promotions unlocked
            unpin = [e for e in held.pinned if e.meta.key in drop]
            held.pinned = [e for e in held.pinned if e.meta.key not in drop]
            cut = [f for k, f in held.promotions.items() if k in drop]
            held.promotions = {k: f for k, f in held.promotions.items() if k not in drop}
        self._end_pins(unpin, cut)
        return len(unpin) + len(cut)

    def renew_leases(self, lease_ids: Sequence[LeaseId], lease_s: float | None = None) -> list[LeaseId]:
        """Hold each lease of `lease_ids` that is still held `lease_s` (bounded like a load's hold:
        at most max_lease_s) from now; returns the ids renewed. A lease released, expired or never
        taken is not renewed: its pins ended, and its chunks may be gone (one past its deadline that
        `expire` has not reaped yet still has every pin, so it is renewed, as wait_lease extends it).
        Any client may renew a lease, as any may release one (the vLLM scheduler renews what its
        worker releases): a lease id is an unguessable capability."""
        deadline = self._clock() + self.hold_bound(lease_s)
        renewed: list[LeaseId] = []
        with self._lock:
            for lease_id in lease_ids:
                held = self._leases.get(lease_id)
                if held is not None:
                    held.deadline = max(held.deadline, deadline)
                    renewed.append(lease_id)
        return renewed

    def expire(self, now: float | None = None) -> int:
        """Release every lease, load pin and save reservation past its deadline; returns how many."""
        now = self._clock() if now is None else now
        with self._lock:
            expired = [self._leases.pop(i) for i in [i for i, h in self._leases.items() if h.deadline <= now]]
            loads = [self._loads.pop(i) for i in [i for i, ld in self._loads.items() if ld.deadline <= now]]
            saves = [self._saves.pop(i) for i in [i for i, sv in self._saves.items() if sv.deadline <= now]]
        for held in expired:
            self._unpin_lease(held)
        for load in loads:
            self._finish_load(load)
        for save in saves:
            self._abort_save(save)
        return len(expired) + len(loads) + len(saves)

    def hold_bound(self, hold_s: float | None) -> float:
        """How long a load's pins or a save's slots are held: the client's bound, at most max_lease_s."""
        requested = DEFAULT_HOLD_S if hold_s is None else hold_s
        if not requested > 0:
            raise ServiceError("invalid", f"hold_s must be positive, got {requested}")
        return min(requested, self.max_lease_s)

    def wait_bound(self, wait_s: float | None) -> float | None:
        """A client's bound on a request's waits (None: unbounded), at most max_lease_s: a wait
        past the hold it buys is of no use, and a huge one overflows the waits' timeouts."""
        if wait_s is None:
            return None
        if not wait_s >= 0:
            raise ServiceError("invalid", f"wait_s must be >= 0, got {wait_s}")
        return min(wait_s, self.max_lease_s)

    def wait_lease(self, lease_id: LeaseId | None, keys: Sequence[bytes] | None = None,
                   deadline: float | None = None) -> bool:
        """Wait for the lease's disk promotions (of `keys` only, when given: a load of part of a
        lease, as when vLLM's load planner recomputes its slow hits, waits for nothing else) and
        extend it; False if it is not held. `deadline` (time.monotonic()) bounds the wait: a
        promotion still running then is the load's failed chunk, not a timed-out request."""
        if lease_id is None:
            return False
        with self._lock:
            held = self._leases.get(lease_id)
        if held is None:
            return False
        promotions = held.promotions
        waits = list(promotions.values()) if keys is None else [promotions[k] for k in keys if k in promotions]
        for fut in waits:
            try:
                fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - the load reports the chunk as failed (TimeoutError too)
                pass
        with self._lock:
            if lease_id in self._leases:
                held.deadline = max(held.deadline, self._clock() + 1.0)
        return True

    def _add_lease(self, held: _Lease) -> LeaseId:
        with self._lock:
            while True:
                lease_id = secrets.randbits(62) + 1
                if lease_id not in self._leases:
                    self._leases[lease_id] = held
                    return lease_id

    def _unpin_lease(self, held: _Lease) -> None:
        """Unpin a lease's chunks without waiting for its promotions: a release must not wait on
        disk reads (the vLLM scheduler releases the hits its load planner chose to recompute, on
        its own thread; measured, a throttled disk's promotions made it wait 2.2 s per request).
        Promotions not started are cancelled; one under way unpins its chunk when it ends."""
        self._end_pins(held.pinned, held.promotions.values())

    def _end_pins(self, pinned: list[ChunkEntry], promotions: Iterable[Future[ChunkEntry | None]]) -> None:
        self.memory.release(pinned)
        for fut in promotions:
            if not fut.cancel():
                fut.add_done_callback(self._unpin_promoted)

    def _unpin_promoted(self, fut: Future[ChunkEntry | None]) -> None:
        try:
            promoted = fut.result()
        except Exception:  # noqa: BLE001 - a failed promotion pinned nothing
            promoted = None
        if promoted is not None:
            self.memory.release([promoted])

    def _touch(self, keys: Sequence[bytes], tiers: Sequence[str]) -> None:
        disk = self.store.disk
        in_mem = [k for k, t in zip(keys, tiers, strict=False) if t == "memory"]
        if in_mem:
            self.memory.touch(in_mem)
        if len(in_mem) == len(tiers):
            return
        if disk is not None:
            disk.touch([k for k, t in zip(keys, tiers, strict=False) if t == "disk"])
        for lower in self.store.lower_tiers:  # a shared folder's owner learns of other hosts' hits
            hit = [k for k, t in zip(keys, tiers, strict=False) if t == lower.name]
            if hit:
                lower.touch(hit)

    # -- promotion ---------------------------------------------------------------------
    def _promote_pin(self, key: bytes) -> ChunkEntry | None:
        """Pin `key` in DRAM, reading it from disk (or a lower tier) into a fresh slot if needed;
        its pinned entry, or None if impossible."""
        mem = self.memory
        entry = mem.pin_entry(key)
        if entry is not None:
            return entry
        if self.store.disk is None and not self.store.lower_tiers:
            return None
        res = self.store.allocate_memory(key)  # waits for pending disk writes to free a slot
        if res is None:
            return None
        layers = list(range(self.store.layout.num_layers))
        try:
            found = self.store.read_lower(key, layers, [mem.layer_view(res.slot, layer) for layer in layers])
        except BaseException:
            mem.abort(res)
            raise
        meta = found[1] if found is not None else None
        if meta is None:
            mem.abort(res)
            return mem.pin_entry(key)  # promoted by another thread meanwhile?
        res.filled.update(layers)
        return mem.commit_pinned(res, meta)[1]  # (promoted by another thread first: that one, ours freed)

    def _promoted_from(self, key: bytes) -> str:
        """The tier below DRAM a promoted chunk came from: the disk tier if it has the chunk,
        else the lower tier (named when there is only one)."""
        store = self.store
        if (store.disk is not None and store.disk.contains(key)) or not store.lower_tiers:
            return "disk"
        return store.lower_tiers[0].name if len(store.lower_tiers) == 1 else "lower"

    # -- loads -------------------------------------------------------------------------
    def load_begin(self, owner: OwnerId, keys: Sequence[bytes], lease_id: LeaseId | None = None,
                   hold_s: float | None = None, wait_s: float | None = None) -> LoadPins:
        """Pin `keys` in DRAM for the caller to copy, promoting from the tiers below. `wait_s`
        bounds the wait for promotions (the client gives up on a reply after its request
        timeout, and then drops its connection, and with it its other leases and saves): a
        chunk not in DRAM by then is reported missing (-1), and unpinned when it lands."""
        hold = self.hold_bound(hold_s)
        bound = self.wait_bound(wait_s)
        deadline = None if bound is None else time.monotonic() + bound
        self.wait_lease(lease_id, keys, deadline)
        started = time.perf_counter()
        mem = self.memory
        slots = [NO_SLOT] * len(keys)
        tiers = [""] * len(keys)
        entries: list[ChunkEntry | None] = [None] * len(keys)
        promotions: dict[int, Future[ChunkEntry | None]] = {}
        for i, key in enumerate(keys):
            entry = mem.pin_entry(key)
            if entry is not None:
                slots[i], tiers[i], entries[i] = entry.slot, "memory", entry
            elif self.store.lower_tiers or (self.store.disk is not None and self.store.disk.contains(key)):
                promotions[i] = self._promoter.submit(self._promote_pin, key)  # a lower miss pins nothing
        for i, fut in promotions.items():
            try:
                promoted = fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError:  # past the client's bound: a failed chunk; its pin ends when it lands
                promoted = None
                self._end_pins([], [fut])
            except Exception:  # noqa: BLE001 - a failed read is a failed chunk, reported by index
                promoted = None
            if promoted is not None:
                slots[i], tiers[i], entries[i] = promoted.slot, self._promoted_from(keys[i]), promoted
        # counted from the few promotions, not by a pass over every chunk of the batch
        from_memory = sum(e is not None for e in entries)
        if promotions:
            served = {tiers[i]: 0 for i in promotions if tiers[i]}
            for i in promotions:
                if tiers[i]:
                    served[tiers[i]] += 1
            from_memory -= sum(served.values())
            self.store.count_served_chunks(served)
            promoted_s = time.perf_counter() - started  # one observation per lower tier promoted from
            for source in served:
                self.store.metrics.observe(m.LOAD_LATENCY, promoted_s, tier=source)
        self._count_memory_reads(from_memory, len(keys) - from_memory)  # a promoted chunk was a DRAM miss
        if from_memory:
            self._mem_served_tokens.inc(from_memory * self.store.chunk_tokens)
        checksums = [e.meta.checksums if e is not None else () for e in entries]  # of the pinned entry's bytes
        load_id = next(self._ids)
        with self._lock:
            self._loads[load_id] = _Load(owner, list(keys), entries, self._clock() + hold, started)
        return LoadPins(load_id, slots, tiers, checksums, hold)

    def _count_memory_reads(self, hits: int, misses: int) -> None:
        """The DRAM tier's hits and misses for a load: its clients copy chunks out of the pool
        themselves, so the service counts what MemoryTier.read would have counted."""
        if hits:
            self._mem_hits.inc(hits)
            self._mem_bytes_read.inc(hits * self.memory.chunk_bytes)
        if misses:
            self._mem_misses.inc(misses)

    def load_end(self, owner: OwnerId, load_id: int, corrupt: Sequence[int] = ()) -> None:
        with self._lock:
            load = self._loads.get(load_id)
            if load is None or load.owner != owner:
                raise ServiceError("unknown_load", f"load {load_id} is not in progress for this client "
                                   "(its pins expired, or it was never begun)")
            del self._loads[load_id]
        for i in corrupt:
            entry = load.entries[i] if 0 <= i < len(load.entries) else None
            if entry is not None:  # the bytes the client copied failed their checksum: never served again
                self.memory.condemn(entry)
        self._finish_load(load)
        if any(e is not None for e in load.entries):  # the chunks reached the client from the DRAM pool
            self._mem_load_latency.observe(time.perf_counter() - load.started)

    def _finish_load(self, load: _Load) -> None:
        self.memory.release(load.entries)

    # -- saves -------------------------------------------------------------------------
    def allocate(self, owner: OwnerId, keys: Sequence[bytes], parent: bytes, first_depth: int,
                 hold_s: float | None = None, wait_s: float | None = None) -> Allocation:
        """Reserve slots for the chain; `wait_s` bounds the total wait for disk writes to free
        slots (the client gives up on a reply after its request timeout: better a shorter grant)."""
        hold = self.hold_bound(hold_s)
        bound = self.wait_bound(wait_s)
        wait_until = None if bound is None else time.monotonic() + bound
        mem, disk = self.memory, self.store.disk
        reservations: list[Reservation | None] = []
        slots: list[int] = []
        granted = len(keys)
        prev = parent
        try:
            for i, key in enumerate(keys):
                if mem.contains(key) or (disk is not None and disk.contains(key)):
                    reservations.append(None)
                    slots.append(NO_SLOT)
                else:
                    left = None if wait_until is None else max(0.0, wait_until - time.monotonic())
                    res = self.store.allocate_memory(key, prev, first_depth + i, wait_s=left)  # waits for disk writes
                    if res is None:
                        granted = i
                        break
                    reservations.append(res)
                    slots.append(res.slot)
                prev = key
        except BaseException:  # no save holds them yet: given back here, or never
            for res in reservations:
                if res is not None:
                    mem.abort(res)
            raise
        slots.extend([NO_SLOT] * (len(keys) - len(slots)))
        save_id = next(self._ids)
        with self._lock:
            self._saves[save_id] = _Save(owner, list(keys), parent, first_depth, reservations, granted,
                                         self._clock() + hold)
            self._saving.update(keys)
        return Allocation(save_id, slots, granted, hold)

    def commit(self, owner: OwnerId, save_id: int,
               extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None = None) -> tuple[SaveResult, TransferHandle[SaveResult]]:
        """Publish a filled allocation in chain order; the disk write is queued, not awaited.
        `extras[i]`: optional sections stored with chunk i (its engine block hashes, ...)."""
        save = self._take_save(owner, save_id)
        if extras is not None and len(extras) != len(save.keys):
            self._abort_save(save)
            raise ServiceError("invalid", f"commit: {len(save.keys)} chunks but {len(extras)} extras")
        mem, disk = self.memory, self.store.disk
        layers = range(self.store.layout.num_layers)
        metas: list[ChunkMeta] = []
        pinned: list[ChunkEntry] = []
        started = time.perf_counter()
        try:
            prev = save.parent
            for i, res in enumerate(save.reservations):
                key = save.keys[i]
                if res is not None:
                    res.filled.update(layers)
                    meta = ChunkMeta(key, prev, save.first_depth + i, self.store.chunk_tokens,
                                     mem.layer_checksums(res), extras[i] if extras is not None else ())
                    # pinned as it is published, until its disk write lands: an allocation or
                    # promotion on another thread must not evict it while later chunks are
                    # still being checksummed (it would then never reach the disk tier).
                    # Another writer may have stored the key first: its entry is pinned, and
                    # persist writes its meta (the checksums of its bytes) with them
                    pinned.append(mem.commit_pinned(res, meta)[1])
                    metas.append(meta)
                prev = key
        except BaseException:
            mem.release(pinned)
            self._abort_save(save)
            raise
        self.store.metrics.observe(m.SAVE_LATENCY, time.perf_counter() - started, tier=mem.name)
        try:
            handle = self.store.persist(metas, pinned=pinned)
        finally:
            self._end_save(save)  # its lower-tier writes are queued: store.wait_lower sees them from here
        with self._lock:
            self._writes.setdefault(owner, []).append((save_id, handle))
        done = save.keys[: save.granted]
        in_memory = sum(1 for k in done if mem.contains(k))
        on_disk = sum(1 for k in done if disk is not None and disk.contains(k))
        errors = () if save.granted == len(save.keys) else (
            f"chunks {save.granted}..{len(save.keys) - 1}: no free DRAM slot (all pinned or reserved)",)
        return SaveResult(len(save.keys), in_memory, on_disk, errors), handle

    def take_disk_errors(self, owner: OwnerId, wait: bool = False) -> list[str]:
        """What went wrong in the disk writes of `owner`'s committed saves, each reported once.

        The service commits a save to DRAM and writes disk in the background, so a client
        would otherwise never hear of a full or read-only disk. With `wait`, first wait for
        every write of this owner (flush); without, only the writes already finished count."""
        with self._lock:
            writes = self._writes.get(owner, [])
            if wait:
                taken, left = writes, []
            else:
                taken = [w for w in writes if w[1].done()]
                left = [w for w in writes if not w[1].done()]
            if owner in self._writes:
                self._writes[owner] = left
        errors = []
        for save_id, handle in taken:
            exc = handle.exception()  # waits when not done
            if exc is not None:
                errors.append(f"disk write of save {save_id}: {exc}")
                continue
            result = handle.wait()
            if result.errors:
                errors.append(f"disk write of save {save_id}: " + "; ".join(result.errors))
        return errors

    def abort(self, owner: OwnerId, save_id: int) -> None:
        self._abort_save(self._take_save(owner, save_id))

    def renew_save(self, owner: OwnerId, save_id: int, hold_s: float | None = None) -> float:
        """Hold a save's reserved slots `hold_s` (bounded like allocate's) from now: a live client
        whose forward outlasts one hold (a long prefill step on a slow engine) renews as it writes,
        and a stalled one, which does not, still loses them. Returns the hold granted."""
        hold = self.hold_bound(hold_s)
        with self._lock:
            save = self._saves.get(save_id)
            if save is None or save.owner != owner:
                raise ServiceError("unknown_save", f"save {save_id} is not in progress for this client")
            save.deadline = max(save.deadline, self._clock() + hold)
        return hold

    def _take_save(self, owner: OwnerId, save_id: int) -> _Save:
        with self._lock:
            save = self._saves.get(save_id)
            if save is None or save.owner != owner:
                raise ServiceError("unknown_save", f"save {save_id} is not in progress for this client")
            del self._saves[save_id]
        return save

    def _abort_save(self, save: _Save) -> None:
        for res in save.reservations:
            if res is not None:
                self.memory.abort(res)
        self._end_save(save)

    def _end_save(self, save: _Save) -> None:
        with self._lock:
            self._saving.subtract(save.keys)
            for key in save.keys:
                if self._saving[key] <= 0:
                    del self._saving[key]
            self._waiters.notify_all()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait, at most `timeout_s` (None: no bound), until every disk write queued so far has
        ended (their errors stay in their handles: take_disk_errors). FlushTimeoutError past the
        bound (the writes go on); ServiceError("stopping") when interrupt_waits ends the wait."""
        if timeout_s is not None and not timeout_s >= 0:  # NaN too
            raise ValueError(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._interrupted.is_set():
            raise ServiceError("stopping", "the service is stopping; it flushes its disk writes as it stops")
        try:
            self.store.flush(0.0)  # every write ended already (the common case): no thread, no wait
            return
        except TimeoutError:  # one still running (or one failed with a TimeoutError of its own: raised below)
            pass
        with self._lock:  # (interrupt_waits sets the flag under it: nothing is submitted after close)
            if self._interrupted.is_set():
                raise ServiceError("stopping", "the service is stopping; it flushes its disk writes as it stops")
            done = self._queued_flush
            if done is None or done.running() or done.done():  # one not started yet covers this request too
                done = self._queued_flush = self._flusher.submit(self.store.flush)
        done.add_done_callback(self._wake_waiters)  # (at once, here, when already done: not under _lock)
        with self._waiters:
            while not done.done() and not self._interrupted.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._waiters.wait(left)
        if done.done() and not done.cancelled():  # (cancelled: by close, after interrupt_waits)
            done.result()  # what store.flush raised, as when it ran on the caller's thread
            return
        if self._interrupted.is_set():
            raise ServiceError("stopping", "the service is stopping; it flushes its disk writes as it stops")
        raise FlushTimeoutError(f"disk writes were still running after {timeout_s} s (a slow or stuck disk); "
                                "they go on in the background")

    def _wake_waiters(self, _done: Any = None) -> None:
        with self._waiters:
            self._waiters.notify_all()

    def interrupt_waits(self) -> None:
        """The service is stopping (its connections are closing): every flush and wait_lower in
        progress returns now, and later ones at once; the store's close flushes the disk writes."""
        with self._waiters:
            self._interrupted.set()
            self._waiters.notify_all()

    def wait_lower(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Wait, at most `timeout_s`, until every save of `keys` in progress here is committed (or
        aborted) and the lower-tier writes of `keys` have ended (TieredStore.wait_lower); return how
        many of `keys` were still being saved or written then (0: none).

        A save in progress counts too: a GPU worker commits a step's saves once their device-to-host
        copies complete (connectors/vllm/worker.py), which may be after vLLM finished the request
        whose handoff waits here.
        """
        if not timeout_s >= 0:  # NaN too
            raise ValueError(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        wanted = set(keys)
        with self._waiters:
            while True:
                saving = sum(1 for k in wanted if k in self._saving)
                left = deadline - time.monotonic()
                if not saving or left <= 0 or self._interrupted.is_set():
                    break
                self._waiters.wait(left)
        while True:
            left = deadline - time.monotonic()
            writing = self.store.wait_lower(keys, max(0.0, min(left, _WAKE_S)))
            if not writing or left <= _WAKE_S or self._interrupted.is_set():
                break
        return min(len(keys), saving + writing)

    # -- owners ------------------------------------------------------------------------
    def drop_owner(self, owner: OwnerId) -> None:
        """Everything `owner` holds goes back: leases, load pins, reserved slots."""
        with self._lock:
            leases = [lid for lid, h in self._leases.items() if h.owner == owner]
            held = [self._leases.pop(lid) for lid in leases]
            load_ids = [i for i, ld in self._loads.items() if ld.owner == owner]
            loads = [self._loads.pop(i) for i in load_ids]
            save_ids = [i for i, s in self._saves.items() if s.owner == owner]
            saves = [self._saves.pop(i) for i in save_ids]
            self._writes.pop(owner, None)
        for h in held:
            self._unpin_lease(h)
        for ld in loads:
            self._finish_load(ld)
        for s in saves:
            self._abort_save(s)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"leases": len(self._leases), "loads": len(self._loads), "saves": len(self._saves)}

    def stats(self) -> dict[str, object]:
        out = self.store.stats()
        out["slots"] = self.memory.slot_counts()
        out["host"] = self.counts()
        return out

    def close(self) -> None:
        self.interrupt_waits()
        self._flusher.shutdown(wait=False, cancel_futures=True)  # a running store.flush ends with its writes
        self._promoter.shutdown(wait=True)
        with self._lock:
            owners = {h.owner for h in self._leases.values()} | {ld.owner for ld in self._loads.values()} | {
                s.owner for s in self._saves.values()}
        for owner in owners:
            self.drop_owner(owner)
