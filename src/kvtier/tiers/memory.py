"""DRAM tier: a preallocated pool of chunk-sized slots, a key index, reference counts.

Who calls: the TieredStore (in-process mode) or the host service, from several threads.

A chunk's payload lives in one slot, layer-major ([layer][kv_heads, planes, tokens,
head_size]), so one layer's section is one contiguous copy. A slot being read holds a
reference and is never evicted or reused until released. Writes go through
allocate -> fill (write_layer, any order) -> commit, so a chunk is visible only when
complete; the vLLM connector fills layer by layer as the forward pass runs.

The pool buffer is injectable: the host service passes POSIX shared memory, so engine
processes copy to and from the same slots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.core import metrics as m
from kvtier.core.codec import checksum, checksum_at
from kvtier.core.config import MemoryTierConfig
from kvtier.core.errors import ConfigError, StoreClosedError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import (
    Buffer,
    ChunkMeta,
    Tier,
    TierUsage,
    as_bytes_view,
    buffer_address,
    check_chunk,
    check_dests,
    check_key,
    copy_memory,
)
from kvtier.tiers.policies import make_policy
from kvtier.tiers.pool import PoolRegion, aligned_pool

SlotId = int


@dataclass(slots=True)
class ChunkEntry:
    slot: SlotId
    meta: ChunkMeta
    refs: int = 0
    condemned: bool = False  # failed a borrowed read's checksum: unindexed, its slot freed at the last release


@dataclass(slots=True)
class Reservation:
    """A slot allocated for a chunk that is still being filled."""

    slot: SlotId
    key: bytes
    filled: set[int] = field(default_factory=set)


class MemoryTier(Tier):
    name = "memory"

    def __init__(
        self,
        layout: KVLayout,
        chunk_tokens: int,
        config: MemoryTierConfig,
        metrics: m.Metrics | None = None,
        pool: Buffer | None = None,
        on_evict: Callable[[ChunkMeta, np.ndarray], None] | None = None,
    ) -> None:
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.config = config
        self.metrics = metrics or m.Metrics()
        self.chunk_bytes = layout.chunk_bytes(chunk_tokens)
        self.num_slots = config.capacity_bytes // self.chunk_bytes
        if self.num_slots <= 0:
            raise ConfigError(
                f"memory.capacity_bytes {config.capacity_bytes} holds no chunk of {self.chunk_bytes} bytes"
            )
        size = self.num_slots * self.chunk_bytes
        if pool is None:
            self._pool = aligned_pool(size)  # page-aligned: a GPU connector may page-lock exactly it
        else:
            self._pool = np.frombuffer(pool, dtype=np.uint8)
            if self._pool.nbytes < size:
                raise ConfigError(f"memory pool has {self._pool.nbytes} bytes, {size} needed")
        self._pool_addr = int(self._pool.ctypes.data)  # valid while self._pool lives
        self._hits = self.metrics.counter(m.HITS, tier=self.name)
        self._bytes_read = self.metrics.counter(m.BYTES_READ, tier=self.name)
        self._read_seconds = self.metrics.counter(m.READ_SECONDS, tier=self.name)
        self._policy = make_policy(config.policy)
        self._index: dict[bytes, ChunkEntry] = {}
        self._free: list[SlotId] = list(range(self.num_slots - 1, -1, -1))
        self._reserved: dict[SlotId, Reservation] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._on_evict = on_evict

    def pool_region(self) -> PoolRegion:
        """Where the slots live in this process (for page-locking them; see tiers/pool.py)."""
        return PoolRegion(self._pool_addr, self.num_slots * self.chunk_bytes)

    # -- views -------------------------------------------------------------------
    def layer_view(self, slot: SlotId, layer: int) -> np.ndarray:
        lb = self.layer_bytes
        start = slot * self.chunk_bytes + layer * lb
        return self._pool[start : start + lb]

    def slot_view(self, slot: SlotId) -> np.ndarray:
        start = slot * self.chunk_bytes
        return self._pool[start : start + self.chunk_bytes]

    # -- lookup --------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self._index

    def lookup(self, keys: Sequence[bytes]) -> int:
        index = self._index
        n = 0
        for key in keys:
            if key not in index:
                break
            n += 1
        return n

    def meta(self, key: bytes) -> ChunkMeta | None:
        entry = self._index.get(key)
        return entry.meta if entry else None

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._policy.touch(keys)

    # -- pinning -------------------------------------------------------------------
    # A pin is a reference on one resident entry, returned through release(entries), never by
    # key: a chunk found corrupt while pinned is unindexed at once, and its key may be saved
    # again while the old entry's pins are still out, so a key no longer names the pinned entry.
    def pin_entry(self, key: bytes) -> ChunkEntry | None:
        """Take a reference on a resident chunk so it cannot be evicted (its entry: slot and
        meta; give it back with release([entry])); None if absent."""
        with self._lock:
            entry = self._index.get(key)
            if entry is not None:
                entry.refs += 1
            return entry

    def pin_entries(self, keys: Sequence[bytes]) -> list[ChunkEntry | None]:
        """`pin` of many resident chunks under one lock, counting nothing (the caller counts what it
        serves): each key's entry (slot and meta) with a reference taken, None where absent. Give
        them back with release(). TieredStore.gather_here pins a decode step's hundreds of blocks so."""
        with self._lock:
            index = self._index
            out = [index.get(key) for key in keys]
            for entry in out:
                if entry is not None:
                    entry.refs += 1
        return out

    def slot_of(self, key: bytes) -> SlotId | None:
        entry = self._index.get(key)
        return entry.slot if entry else None

    # -- borrowing: reads straight out of the pool -------------------------------------
    def pool_array(self) -> np.ndarray:
        """The whole pool (every slot) as one uint8 array: borrowed sections are read from it in place."""
        return self._pool[: self.num_slots * self.chunk_bytes]

    def borrow(self, keys: Sequence[bytes]) -> list[ChunkEntry | None]:
        """Pin each resident chunk (None where absent) so that its slot can be read in place, as a
        GPU connector's host -> device copies do from a page-locked pool: no eviction or delete
        reuses a borrowed slot until release(). Check the sections read with verify_borrowed()
        before the bytes are used."""
        for key in keys:
            check_key(key)
        self._check_open()
        out = self.pin_entries(keys)
        found = sum(e is not None for e in out)
        if found:
            self._hits.inc(found)
        if found < len(out):
            self.metrics.inc(m.MISSES, len(out) - found, tier=self.name)
        return out

    def verify_borrowed(self, entry: ChunkEntry, layers: Sequence[int]) -> bool:
        """Whether the borrowed chunk's sections `layers` match their checksums (True without
        verify_reads). A mismatch is counted and the chunk unindexed at once (no lookup finds it
        again); its slot is freed at its last release."""
        t0 = time.perf_counter()
        lb = self.layer_bytes
        ok = True
        if self.config.verify_reads:
            sums = entry.meta.checksums
            base = self._pool_addr + entry.slot * self.chunk_bytes  # checked on verify threads: GIL let go
            ok = all(checksum_at(base + layer * lb, lb) == sums[layer] for layer in layers)
        self._bytes_read.inc(len(layers) * lb)
        self._read_seconds.inc(time.perf_counter() - t0)
        if not ok:
            self.condemn(entry)
        return ok

    def condemn(self, entry: ChunkEntry) -> None:
        """A pinned chunk whose bytes a reader found corrupt (the service's clients check what they
        copy out of the pool): unindexed at once, its slot freed at its last release."""
        self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
        with self._lock:
            self._condemn(entry)
        self._deliver_changes()
        self._report_usage()

    def _condemn(self, entry: ChunkEntry) -> None:
        """Under the lock: a chunk whose bytes failed their checksum leaves the index at once (no
        lookup finds it again) even while pinned; its slot is freed at its last release."""
        entry.condemned = True
        key = entry.meta.key
        if self._index.get(key) is entry:
            del self._index[key]
            self._policy.remove(key)
            self._record_removed(key)

    def release(self, entries: Sequence[ChunkEntry | None]) -> None:
        """Drop the references borrow(), pin_entry(), pin_entries() or commit_pinned() took (None
        entries are skipped). Safe after close()."""
        with self._lock:
            for entry in entries:
                if entry is not None:
                    self._unref(entry)

    def _unref(self, entry: ChunkEntry) -> None:
        """Under the lock: drop one reference; a condemned chunk's slot is free at its last one."""
        if entry.refs <= 0:
            raise ValueError(f"release of chunk {entry.meta.key.hex()[:16]}, which is not pinned")
        entry.refs -= 1
        if entry.condemned and entry.refs == 0:
            self._free.append(entry.slot)

    # -- read ----------------------------------------------------------------------
    def read(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> ChunkMeta | None:
        check_key(key)
        views = check_dests(self, layers, dests)
        self._check_open()
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                self.metrics.inc(m.MISSES, tier=self.name)
                return None
            entry.refs += 1
        t0 = time.perf_counter()
        ok = True
        lb = self.layer_bytes
        base = self._pool_addr + entry.slot * self.chunk_bytes
        verify = self.config.verify_reads
        sums = entry.meta.checksums
        try:
            for layer, dest in zip(layers, views):
                # each section is copied and, while it is still in cache, verified (the destination's
                # address is taken only now: a tiered load asks this tier first, and most asks miss)
                copy_memory(buffer_address(dest), base + layer * lb, lb)
                if verify and checksum_at(buffer_address(dest), lb) != sums[layer]:
                    ok = False
                    break
        finally:
            with self._lock:
                if not ok:
                    self._condemn(entry)  # pinned by others too: gone from the index all the same
                self._unref(entry)  # the last reference (a borrower may have condemned it too) frees it
        if not ok:
            self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
            self._deliver_changes()
            self._report_usage()
            return None
        self._hits.inc()
        self._bytes_read.inc(len(layers) * lb)
        self._read_seconds.inc(time.perf_counter() - t0)
        return entry.meta

    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None:
        entry = self._index.get(key)
        if entry is None:
            return None
        for k, i, data in entry.meta.extras:
            if k == kind and i == index:
                return data
        return None

    # -- write ---------------------------------------------------------------------
    def allocate(self, key: bytes, parent: bytes | None = None, depth: int = 0) -> Reservation | None:
        """Reserve a slot for `key`, evicting if needed; None if no room or not admitted.

        An evicted chunk is handed to `on_evict` (write-back's copy to disk) after the lock is
        released, so readers of other chunks never wait on that copy: its slot already belongs
        to the new reservation, which no one can write before this returns it."""
        if parent is None:
            check_key(key)
        else:
            check_chunk(key, parent, depth)
        self._check_open()
        evicted: ChunkMeta | None = None
        with self._lock:
            if not self._policy.admit(key, parent, depth):
                return None
            if self._free:
                slot = self._free.pop()
            else:
                victim = self._evict_one()
                if victim is None:
                    return None
                slot, evicted = victim
            res = Reservation(slot, key)
            self._reserved[slot] = res
        self._deliver_changes()
        if evicted is not None and self._on_evict is not None:
            try:
                self._on_evict(evicted, self.slot_view(slot))  # copies the bytes before returning
            except BaseException:
                self.abort(res)
                raise
        return res

    def write_layer(self, res: Reservation, layer: int, src: Buffer) -> None:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer!r} is outside 0..{self.layout.num_layers - 1}")
        view = as_bytes_view(src)
        if view.nbytes != self.layer_bytes:
            raise ValueError(f"layer {layer} source has {view.nbytes} bytes, a section has {self.layer_bytes}")
        if self._reserved.get(res.slot) is not res:
            raise ValueError("write to a reservation that was committed or aborted")
        copy_memory(self._pool_addr + res.slot * self.chunk_bytes + layer * self.layer_bytes,
                    buffer_address(view), self.layer_bytes)
        res.filled.add(layer)

    def layer_checksums(self, res: Reservation) -> tuple[int, ...]:
        return tuple(checksum(self.layer_view(res.slot, layer)) for layer in range(self.layout.num_layers))

    def commit(self, res: Reservation, meta: ChunkMeta) -> bool:
        """Publish a filled reservation. False if the key was already resident (slot freed)."""
        return self._publish(res, meta, False)[0]

    def commit_pinned(self, res: Reservation, meta: ChunkMeta) -> tuple[bool, ChunkEntry]:
        """commit() that pins the resident chunk in the same step, so no eviction can slip in
        between publishing and pinning: (whether ours was published, the resident entry, ours or
        the one already there; its meta is the one to write to lower tiers: its checksums are
        those of its slot's bytes). Give the pin back with release([entry])."""
        published, entry = self._publish(res, meta, True)
        assert entry is not None
        return published, entry

    def _publish(self, res: Reservation, meta: ChunkMeta, pin: bool) -> tuple[bool, ChunkEntry | None]:
        if len(res.filled) != self.layout.num_layers:
            missing = sorted(set(range(self.layout.num_layers)) - res.filled)
            raise ValueError(f"commit of chunk with unfilled layers {missing[:8]}")
        if meta.key != res.key:
            raise ValueError("commit meta does not match the reservation's key")
        with self._lock:
            if self._reserved.get(res.slot) is not res:
                raise ValueError("commit of a reservation that was committed or aborted")
            del self._reserved[res.slot]
            existing = self._index.get(res.key)
            if existing is not None:
                self._free.append(res.slot)
                existing.refs += pin
                return False, existing
            try:
                # the policy first: if it fails, the slot goes back rather than into an index
                # entry no eviction could ever choose
                self._policy.insert(res.key, meta.parent, meta.depth)
            except BaseException:
                self._free.append(res.slot)
                raise
            entry = self._index[res.key] = ChunkEntry(res.slot, meta, int(pin))
            self._record_stored(meta)
        self._deliver_changes()
        self.metrics.inc(m.BYTES_WRITTEN, self.chunk_bytes, tier=self.name)
        self._report_usage()
        return True, entry

    def abort(self, res: Reservation) -> None:
        with self._lock:
            if self._reserved.get(res.slot) is res:
                del self._reserved[res.slot]
                self._free.append(res.slot)

    def write(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bool:
        check_chunk(meta.key, meta.parent, meta.depth, "meta.key")
        if len(layers) != self.layout.num_layers:
            raise ValueError(f"write needs {self.layout.num_layers} layer buffers, got {len(layers)}")
        if meta.key in self._index:
            return True
        res = self.allocate(meta.key, meta.parent, meta.depth)
        if res is None:
            return False
        try:
            for layer, src in enumerate(layers):
                self.write_layer(res, layer, src)
        except BaseException:
            self.abort(res)
            raise
        self.commit(res, meta)
        return True

    def _evict_one(self) -> tuple[SlotId, ChunkMeta] | None:
        """Under the lock: unindex a victim; its slot and meta (the caller hands both to on_evict)."""
        index = self._index

        def can_evict(key: bytes) -> bool:
            entry = index.get(key)
            return entry is not None and entry.refs == 0

        victim = self._policy.evict(can_evict)
        if victim is None:
            return None
        entry = index.pop(victim)
        self._record_removed(victim)
        self.metrics.inc(m.EVICTIONS, tier=self.name)
        return entry.slot, entry.meta

    # -- delete / usage / close ------------------------------------------------------
    def delete(self, key: bytes) -> bool:
        with self._lock:
            entry = self._index.get(key)
            if entry is None or entry.refs > 0:
                return False
            del self._index[key]
            self._policy.remove(key)
            self._free.append(entry.slot)
            self._record_removed(key)
        self._deliver_changes()
        self._report_usage()
        return True

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def slot_counts(self) -> dict[str, int]:
        """Slot accounting: free + reserved + resident == slots at every quiet moment."""
        with self._lock:
            return {
                "slots": self.num_slots,
                "free": len(self._free),
                "reserved": len(self._reserved),
                "resident": len(self._index),
                "pinned": sum(1 for e in self._index.values() if e.refs > 0),
            }

    def usage(self) -> TierUsage:
        n = len(self._index)
        return TierUsage(n * self.chunk_bytes, self.num_slots * self.chunk_bytes, n)

    def _report_usage(self) -> None:
        self.metrics.set(m.USED_BYTES, len(self._index) * self.chunk_bytes, tier=self.name)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("memory tier is closed")

    def close(self) -> None:
        self._closed = True
