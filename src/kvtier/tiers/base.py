"""The tier protocol: one small batched interface that every tier implements.

Called by the TieredStore (kvtier.store), under its own threads; every method is
thread-safe. Payloads are plain buffers (anything with the buffer protocol: bytearray,
numpy arrays, CPU torch tensors via .numpy()), so tiers need no torch.

    lookup(keys) -> int            how many leading keys this tier holds
    contains(key) -> bool
    read(key, layers, dests)       copy the KV sections of `layers` into `dests` (one
                                   writable buffer per layer); returns the chunk's meta,
                                   or None for a miss. A chunk that fails validation is a
                                   miss: it is deleted and counted, never returned.
    read_section(key, kind, index) an optional typed section (summaries), or None
    write(meta, layers) -> bool    store a whole chunk; False if the policy did not admit
                                   it or there is no room; raises TierRefusedError when it
                                   declines it for a reason worth reporting (disk full) and
                                   TierWriteError on I/O failure, leaving the tier as it was
Keys, parents and depths are checked at each call (`check_key`, `check_chunk`): a bad one
raises ValueError naming it before the tier takes a slot or a file for it.
    delete(key) -> bool, touch(keys), usage(), close()
    add_observer(fn), remove_observer(fn)
                                   `fn(TierChange)` hears every chunk the tier gains or
                                   loses (kvtier.events publishes them as KV events)
    read_many(keys, layers, dests)  `read` of several chunks (batched by networked tiers)
    read_gbps() -> float | None     measured read bandwidth, for the load planner
"""

from __future__ import annotations

import ctypes
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from kvtier.core import metrics as m
from kvtier.core.codec import MAX_KEY_BYTES, SECTION_KV, checksum
from kvtier.core.errors import KVTierError
from kvtier.core.keys import HASH_MODES
from kvtier.core.layout import KVLayout

Buffer = Any  # an object supporting the buffer protocol
_log = logging.getLogger(__name__)


class TierWriteError(KVTierError):
    """A write to a tier failed (disk full, read-only folder, ...); the tier is unchanged."""


class TierRefusedError(TierWriteError):
    """The tier declined a chunk it could not store without harm (the disk stayed full after
    evicting what could go); the tier is unchanged. The store reports it in SaveResult.errors
    rather than failing the save's handle: the chunk is simply not in that tier."""


# Key lengths kvtier's hash modes produce: 16 (xxh3_128) and 32 bytes (sha256, blake2b). The
# store takes only these; a tier takes any key its chunk format can hold (1..MAX_KEY_BYTES),
# as the trace benchmark's short keys need.
KEY_LENGTHS = tuple(sorted({mode.key_bytes for mode in HASH_MODES.values()}))


def check_key(key: object, name: str = "key", lengths: tuple[int, ...] | None = None) -> bytes:
    """`key` as a chunk key, or ValueError naming `name`: bytes, of one of `lengths` (default:
    1..MAX_KEY_BYTES, what the chunk format holds).

    Checked where a key enters a tier or the store, so a bad one fails at the call that
    passed it, before any slot or file is taken for it."""
    if type(key) is not bytes:
        raise ValueError(f"{name} must be bytes, got {type(key).__name__}")
    if lengths is not None:
        if len(key) not in lengths:
            raise ValueError(f"{name} has {len(key)} bytes; a chunk key has {' or '.join(map(str, lengths))}")
    elif not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"{name} has {len(key)} bytes; a chunk key has 1..{MAX_KEY_BYTES}")
    return key


def check_chunk(key: object, parent: object, depth: object, name: str = "key") -> None:
    """A chunk's identity: key and parent keys of one length, depth an int >= 0."""
    check_key(key, name)
    check_key(parent, "parent")
    if len(parent) != len(key):  # type: ignore[arg-type]
        raise ValueError(f"parent has {len(parent)} bytes but {name} has {len(key)}")  # type: ignore[arg-type]
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")


@dataclass(slots=True, frozen=True)
class ChunkMeta:
    """What a tier knows about a stored chunk besides its payload."""

    key: bytes
    parent: bytes  # the namespace root for a chain's first chunk (depth 0)
    depth: int
    num_tokens: int
    checksums: tuple[int, ...]  # xxh3_64 of each KV layer section
    extras: tuple[tuple[int, int, bytes], ...] = ()  # optional (kind, index, data) sections


def chunk_sections(meta: ChunkMeta, layers: Sequence[Buffer], num_layers: int,
                   layer_bytes: int) -> tuple[list[tuple[int, int, int, int]], list[memoryview]]:
    """What a stored chunk is encoded from (the disk file and the Redis value alike): its
    section table entries (kind, index, bytes, checksum) and their payloads, the KV layers in
    order and then `meta.extras`. ValueError naming the argument that does not fit the layout."""
    if len(layers) != num_layers or len(meta.checksums) != num_layers:
        raise ValueError(f"write needs {num_layers} layer buffers and checksums, "
                         f"got {len(layers)} and {len(meta.checksums)}")
    payloads = [as_bytes_view(b) for b in layers]
    for layer, src in enumerate(payloads):
        if src.nbytes != layer_bytes:
            raise ValueError(f"layer {layer} source has {src.nbytes} bytes, a section has {layer_bytes}")
    sections = [(SECTION_KV, layer, layer_bytes, meta.checksums[layer]) for layer in range(num_layers)]
    for kind, index, data in meta.extras:
        if kind == SECTION_KV:
            raise ValueError("extra sections must not use SECTION_KV")
        sections.append((kind, index, len(data), checksum(data)))
        payloads.append(memoryview(data).cast("B"))
    return sections, payloads


@dataclass(slots=True, frozen=True)
class TierUsage:
    used_bytes: int
    capacity_bytes: int
    chunks: int


class TierChange(NamedTuple):
    """One thing a tier gained or lost, as its observers hear it.

    `kind` is "stored" (with `meta`) or "removed" (meta None: an eviction, a delete, a chunk
    dropped as corrupt)."""

    kind: str
    tier: str
    key: bytes
    meta: ChunkMeta | None = None


TierObserver = Callable[[TierChange], None]


class Tier(ABC):
    name: str
    layout: KVLayout
    chunk_tokens: int
    # Observers and their pending changes: set per instance by add_observer; an empty tuple (no
    # observer) keeps the recording calls on the hot path to one test.
    _observers: tuple[TierObserver, ...] = ()
    observer_errors: int = 0

    def add_observer(self, fn: TierObserver) -> None:
        """Call `fn(change)` for every chunk this tier gains or loses from now on.

        Changes are recorded under the tier's lock, in the order they happened, and delivered
        after it is released, one at a time, so `fn` may be slow without stalling readers. An
        exception from `fn` is logged and counted (`observer_errors`), never raised into the tier."""
        if not callable(fn):
            raise ValueError(f"observer must be callable, got {type(fn).__name__}")
        if not self._observers:
            self._changes: deque[TierChange] = deque()
            self._deliver_lock = threading.Lock()
        self._observers = (*self._observers, fn)

    def remove_observer(self, fn: TierObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not fn)

    def _record_stored(self, meta: ChunkMeta) -> None:
        if self._observers:
            self._changes.append(TierChange("stored", self.name, meta.key, meta))

    def _record_removed(self, key: bytes) -> None:
        if self._observers:
            self._changes.append(TierChange("removed", self.name, key))

    def _deliver_changes(self) -> None:
        """Hand recorded changes to the observers; call with no tier lock held."""
        if not self._observers:
            return
        with self._deliver_lock:
            changes = self._changes
            while changes:
                change = changes.popleft()
                for fn in self._observers:
                    try:
                        fn(change)
                    except Exception:  # an observer's fault must not fail a save or a load
                        self.observer_errors += 1
                        _log.exception("tier %s: observer %r failed on %s", self.name, fn, change.kind)

    @cached_property
    def layer_bytes(self) -> int:
        return self.layout.layer_bytes(self.chunk_tokens)

    def lookup(self, keys: Sequence[bytes]) -> int:
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def read_many(self, keys: Sequence[bytes], layers: Sequence[int],
                  dests: Sequence[Sequence[Buffer]]) -> list[ChunkMeta | None]:
        """`read` of several chunks (dests[i] for keys[i]); a networked tier batches the requests."""
        return [self.read(key, layers, d) for key, d in zip(keys, dests, strict=True)]

    def read_gbps(self) -> float | None:
        """Measured read bandwidth (GB/s, payload bytes over read seconds) since the tier opened;
        None before its first timed read. For the load planner: is loading from here worth it."""
        metrics = getattr(self, "metrics", None)
        if metrics is None:
            return None
        seconds = metrics.get(m.READ_SECONDS, tier=self.name)
        if seconds <= 0:
            return None
        return metrics.get(m.BYTES_READ, tier=self.name) / seconds / 1e9

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def read(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> ChunkMeta | None: ...

    @abstractmethod
    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None: ...

    @abstractmethod
    def write(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bool: ...

    @abstractmethod
    def delete(self, key: bytes) -> bool: ...

    @abstractmethod
    def touch(self, keys: Sequence[bytes]) -> None: ...

    @abstractmethod
    def usage(self) -> TierUsage: ...

    @abstractmethod
    def close(self) -> None: ...


def check_dests(tier: Tier, layers: Sequence[int], dests: Sequence[Buffer]) -> list[memoryview]:
    """Validate destination buffers: one writable, C-contiguous, section-sized buffer per layer."""
    if len(layers) != len(dests):
        raise ValueError(f"{len(layers)} layers requested but {len(dests)} destination buffers given")
    num_layers = tier.layout.num_layers
    lb = tier.layer_bytes
    out = []
    for layer, dest in zip(layers, dests):
        mv = memoryview(dest)
        # one combined test on the hot path (a load checks every section of every chunk)
        if mv.readonly or not mv.c_contiguous or mv.nbytes != lb or not 0 <= layer < num_layers:
            _bad_dest(layer, mv, num_layers, lb)
        out.append(mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B"))
    return out


def _bad_dest(layer: int, mv: memoryview, num_layers: int, lb: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
    if mv.readonly:
        raise ValueError("destination buffer is read-only")
    if not mv.c_contiguous:
        raise ValueError("destination buffer must be C-contiguous")
    raise ValueError(f"destination for layer {layer} has {mv.nbytes} bytes, a section has {lb}")


_addressof, _c_char = ctypes.addressof, ctypes.c_char


def buffer_address(mv: memoryview) -> int:
    """Address of the first byte of a non-empty C-contiguous buffer.

    The caller keeps `mv` (and so the memory) alive for as long as it uses the address."""
    if not mv.readonly:
        return _addressof(_c_char.from_buffer(mv))
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data)


# ctypes calls C functions with the GIL released, so I/O threads copy in parallel; for
# the section sizes a tier moves (tens of KiB to MiBs) it costs a third of np.copyto's
# per-call overhead. Every caller checks both ranges' lengths first.
copy_memory = ctypes.memmove


def as_bytes_view(buf: Buffer) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("source buffer must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
