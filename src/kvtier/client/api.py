"""The store API that engines call: one interface, in-process or through the host service.

Who calls: connectors (vLLM scheduler and worker processes, transformers caches) and
benchmarks. They use only this module's `StoreClient`, obtained from `connect(config)`.

    layout, chunk_tokens, hash_mode          what the store holds
    namespace(model, ...), chunk_keys(...)   key helpers bound to the store's layout and chunk size
    lookup(keys, lease=False)                -> LookupReply(hits, tiers, lease_id)   (scheduler)
    load(keys, dests, layers, lease_id)      -> TransferHandle[LoadResult]           (worker)
    load_layers(keys, dests, lease_id)       -> LayeredLoad: wait_layer(layer), wait() (worker)
    release(lease_id)                        end a lease (LeaseError if not held)
    renew(lease_ids)                         -> the ids still held, now held lease_timeout_s from now
                                             (the vLLM scheduler keeps its shipped loads' leases alive)
    trim(lease_id, keys)                     drop these keys from a lease, keep the rest (hits a load
                                             planner chose to recompute: their disk reads stop)
    save(keys, parent, first_depth, srcs)    -> TransferHandle[SaveResult]
    begin_save(keys, parent, first_depth)    -> SaveSession: write_layer / commit / abort
    flush(timeout_s=None), stats(), close()
    watch_pool(watcher)                      tell watcher where the DRAM pool this client copies to and
                                             from is mapped, and when it goes (GPU connectors page-lock it)
    lendable_pool()                          the pool region borrow() lends slots of (None: it lends none)
    borrow(keys, lease_id)                   -> BorrowedChunks: chunks pinned in that pool for reads in
                                             place (a GPU worker copies straight out of its slots), or None

Buffers are buffer-protocol objects: dests[i][j] receives layer layers[j] of chunk keys[i]
and srcs[i][layer] holds layer `layer` of chunk keys[i], one C-contiguous section each
([kv_heads, planes, chunk_tokens, head_size] of the layout's dtype).

load_layers loads every layer and lets the caller use layer j while later layers load:
`wait_layer(j)` returns once layer j of every chunk is in place (failed chunks excepted;
call it for layers in order), `wait()` returns the LoadResult or raises. The service client
copies layer by layer on its transfer thread, and a caller blocked in wait_layer copies
sections of that layer itself instead of idling; the default waits for the whole load.

Leases: `lookup(keys, lease=True)` pins the reported chunks (promoting disk hits into
DRAM) so a later `load(..., lease_id=...)`, possibly from another process, finds them;
the lease lasts until `release`, its timeout (renewed by `renew`), or its holder's exit.
A load whose lease was lost still runs and reports exactly which chunks failed: it reads
chunks by key, so one evicted meanwhile is a miss, never the bytes that reused its slot.
A store without a DRAM tier cannot pin: its lookups return lease_id None.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from os import PathLike
from typing import Any, Protocol

import numpy as np

from kvtier.core.config import ClientConfig, load_config
from kvtier.core.errors import ConfigError
from kvtier.core.keys import Namespace, chunk_keys, get_hash_mode
from kvtier.core.layout import KVLayout
from kvtier.service.host import StoreHost
from kvtier.service.protocol import FlushTimeoutError, LeaseError
from kvtier.store.tiered import LoadResult, SaveResult, TieredStore
from kvtier.store.transfer import TransferHandle
from kvtier.tiers.base import Buffer
from kvtier.tiers.pool import PoolRegion, PoolWatcher

__all__ = ["BorrowedChunks", "InProcessClient", "LayeredLoad", "LoadResult", "LookupReply", "SaveResult", "SaveSession", "StoreClient", "connect"]


@dataclass(slots=True, frozen=True)
class LookupReply:
    hits: int  # leading chunks stored
    tiers: tuple[str, ...]  # tier of each hit ("memory" or "disk")
    lease_id: int | None  # set when a lease was asked for and at least one chunk was pinned


class LayeredLoad(Protocol):
    """A load of every layer that hands over layers in order (StoreClient.load_layers)."""

    def wait_layer(self, layer: int) -> None: ...

    def wait(self) -> LoadResult: ...


class WholeLoad:
    """LayeredLoad over a plain load: every layer is ready when the whole load is done."""

    __slots__ = ("handle",)

    def __init__(self, handle: TransferHandle[LoadResult]) -> None:
        self.handle = handle

    def wait_layer(self, layer: int) -> None:
        self.handle.exception()  # waits; a failure is raised by wait()

    def layer_ready(self, layer: int) -> bool:
        """Whether wait_layer(layer) would return at once (lets a GPU connector queue copies early)."""
        return self.handle.done()

    def wait(self) -> LoadResult:
        return self.handle.wait()


class SaveSession(Protocol):
    """A chain of chunks being saved layer by layer (vLLM's save_kv_layer); commit publishes it."""

    def write_layer(self, layer: int, srcs: Sequence[Buffer]) -> None: ...

    def commit(self, extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None = None) -> TransferHandle[SaveResult]:
        """Publish the chain; `extras[i]`: optional (kind, index, bytes) sections stored with chunk i
        (SECTION_BLOCK_HASHES: the engine's block hashes, published in KV events)."""
        ...

    def abort(self) -> None: ...


def check_keys(keys: Sequence[bytes], key_bytes: int, hash_mode: str, name: str = "keys") -> list[bytes]:
    """`keys` as a list if each is bytes of the store's key length; ValueError naming the bad one.

    Checked at the call: a key of the wrong type or length would otherwise be accepted into
    DRAM and fail later, in the codec or the disk tier, far from the caller."""
    if isinstance(keys, (bytes, bytearray, str)):
        raise ValueError(f"{name} must be a sequence of keys, not a single {type(keys).__name__}")
    out = list(keys)
    if set(map(type, out)) <= {bytes} and set(map(len, out)) <= {key_bytes}:
        return out  # the common case, checked in C-speed passes (a lookup carries hundreds of keys)
    for i, key in enumerate(out):
        if not isinstance(key, bytes) or len(key) != key_bytes:
            length = len(key) if isinstance(key, (bytes, bytearray, str)) else "-"
            raise ValueError(f"{name}[{i}] must be a {key_bytes}-byte key (hash mode {hash_mode}), "
                             f"got {type(key).__name__} of length {length}")
    return out


def check_lease_ids(lease_ids: Sequence[int]) -> list[int]:
    """`lease_ids` as a list if each is a lease id (a positive int); ValueError naming the bad one."""
    out = list(lease_ids)
    for i, lease_id in enumerate(out):
        if isinstance(lease_id, bool) or not isinstance(lease_id, int) or lease_id <= 0:
            raise ValueError(f"lease_ids[{i}] must be a lease id (a positive integer), got {lease_id!r}")
    return out


def check_save_args(layout: KVLayout, keys: Sequence[bytes], first_depth: int,
                    srcs: Sequence[Sequence[Buffer]] | None = None) -> None:
    """A save's depth and its layer sources (one per layer of each chunk), checked at the call."""
    if isinstance(first_depth, bool) or not isinstance(first_depth, int) or first_depth < 0:
        raise ValueError(f"first_depth must be an integer >= 0, got {first_depth!r}")
    if srcs is None:
        return
    if len(srcs) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(srcs)} source lists")
    for i, per_chunk in enumerate(srcs):
        if len(per_chunk) != layout.num_layers:
            raise ValueError(f"srcs[{i}] has {len(per_chunk)} layer sources; the layout has {layout.num_layers} layers")


def dest_arrays(layout: KVLayout, chunk_tokens: int, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                layers: Sequence[int] | None) -> tuple[list[int], list[list[np.ndarray]]]:
    """Check load destinations at the call (not later on a worker thread); uint8 views of them."""
    layer_list = list(range(layout.num_layers)) if layers is None else list(layers)
    layer_bytes = layout.layer_bytes(chunk_tokens)
    if len(dests) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(dests)} destination lists")
    for layer in layer_list:
        if not 0 <= layer < layout.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{layout.num_layers - 1}")
    arrays = []
    for per_chunk in dests:
        if len(per_chunk) != len(layer_list):
            raise ValueError(f"each chunk needs {len(layer_list)} destination buffers, got {len(per_chunk)}")
        row = []
        for dest in per_chunk:
            if (type(dest) is np.ndarray and dest.dtype == np.uint8 and dest.nbytes == layer_bytes
                    and dest.ndim == 1 and dest.flags.c_contiguous and dest.flags.writeable):
                row.append(dest)  # the connectors' page views: checked in a few attribute reads
                continue
            mv = memoryview(dest)
            if mv.readonly:
                raise ValueError("destination buffer is read-only")
            if not mv.c_contiguous:
                raise ValueError("destination buffer must be C-contiguous")
            if mv.nbytes != layer_bytes:
                raise ValueError(f"destination has {mv.nbytes} bytes, a section has {layer_bytes}")
            row.append(np.frombuffer(mv.cast("B"), dtype=np.uint8))
        arrays.append(row)
    return layer_list, arrays


class BorrowedChunks(ABC):
    """Chunks pinned in a client's DRAM pool so that the caller reads their slots in place (a GPU
    worker's copies straight out of a page-locked pool): key i is at `slots[i]` (-1: not in DRAM,
    count it failed), its bytes pool[slot * chunk_bytes:][:chunk_bytes], one section per layer in
    order. Nothing reuses a borrowed slot until end(). Use no byte that verify() did not pass."""

    pool: np.ndarray  # the pool the slots index, uint8
    slots: list[int]

    @abstractmethod
    def verify(self, first: int, last: int) -> TransferHandle[LoadResult]:
        """Check every layer of chunks first .. last-1 against their checksums, on background threads
        (codec.checksum_at lets go of the GIL): a LoadResult over those chunks (indices from `first`) whose
        `failed` holds the absent and the corrupt ones."""

    @abstractmethod
    def end(self) -> bool:
        """Hand the chunks back, once every copy out of their slots has completed (corrupt ones are
        dropped from the store). False: the copies cannot be trusted (the pins expired meanwhile, and
        the slots may have been reused): count every chunk failed."""


class NothingBorrowed(BorrowedChunks):
    """A borrow that found no chunk (the service was down): every chunk fails, nothing to hand back."""

    def __init__(self, n: int) -> None:
        self.pool = np.empty(0, dtype=np.uint8)
        self.slots = [-1] * n

    def verify(self, first: int, last: int) -> TransferHandle[LoadResult]:
        n = last - first
        done: Future[LoadResult] = Future()
        done.set_result(LoadResult(0, tuple(range(n)), ("",) * n))
        return TransferHandle(0, "verify", done)

    def end(self) -> bool:
        return True


class _StoreBorrow(BorrowedChunks):
    """Chunks borrowed from an in-process TieredStore's DRAM tier."""

    def __init__(self, store: TieredStore, keys: Sequence[bytes]) -> None:
        self.store = store
        self.entries = store.borrow_memory(keys)
        self.pool = store.pool_array()
        self.slots = [-1 if e is None else int(e.slot) for e in self.entries]
        self._ended = False

    def verify(self, first: int, last: int) -> TransferHandle[LoadResult]:
        return self.store.verify_borrowed(self.entries[first:last], range(self.store.layout.num_layers))

    def end(self) -> bool:
        if not self._ended:
            self._ended = True
            self.store.release_borrowed(self.entries)
        return True


class StoreClient(ABC):
    @property
    @abstractmethod
    def layout(self) -> KVLayout: ...

    @property
    @abstractmethod
    def chunk_tokens(self) -> int: ...

    @property
    @abstractmethod
    def hash_mode(self) -> str: ...

    def namespace(self, model_fingerprint: str, *, tp_rank: int = 0, tenant_salt: str = "",
                  extras: tuple[str, ...] = ()) -> Namespace:
        """The namespace of a model on this store (its root key is the parent of chunk 0)."""
        return Namespace(model_fingerprint, self.layout.layout_id(self.chunk_tokens), tp_rank, tenant_salt,
                         self.hash_mode, extras)

    def chunk_keys(self, root: bytes, tokens: Sequence[int], extra_keys: Sequence[bytes] = ()) -> list[bytes]:
        return list(chunk_keys(root, tokens, self.chunk_tokens, self.hash_mode, extra_keys))

    @abstractmethod
    def lookup(self, keys: Sequence[bytes], lease: bool = False) -> LookupReply: ...

    @abstractmethod
    def load(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]], layers: Sequence[int] | None = None,
             lease_id: int | None = None) -> TransferHandle[LoadResult]: ...

    def load_layers(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                    lease_id: int | None = None) -> LayeredLoad:
        """Load every layer (dests[i][layer]); use layer j once wait_layer(j) returns."""
        return WholeLoad(self.load(keys, dests, None, lease_id))

    @abstractmethod
    def release(self, lease_id: int) -> None: ...

    @abstractmethod
    def renew(self, lease_ids: Sequence[int]) -> list[int]:
        """Hold each lease of `lease_ids` still held this client's lease timeout from now, in one
        call; returns the ids renewed. One released (by the worker, after its load), expired or
        never taken is left out, with no error: its chunks may be gone, so it cannot be revived."""

    @abstractmethod
    def trim(self, lease_id: int, keys: Sequence[bytes]) -> None:
        """Drop `keys` from the lease (their pins end, their disk promotions not started are
        cancelled); the lease keeps its other keys. LeaseError if the lease is not held."""

    @abstractmethod
    def save(self, keys: Sequence[bytes], parent: bytes, first_depth: int,
             srcs: Sequence[Sequence[Buffer]]) -> TransferHandle[SaveResult]: ...

    @abstractmethod
    def begin_save(self, keys: Sequence[bytes], parent: bytes, first_depth: int) -> SaveSession: ...

    @abstractmethod
    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the disk writes of every save so far are done; FlushTimeoutError (a
        ServiceError) when some are still running after `timeout_s`. None: no bound in process,
        protocol.MAX_FLUSH_S through the service (whose connection a flush occupies)."""

    @abstractmethod
    def wait_lower(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Wait, at most `timeout_s`, until the lower-tier writes (shared folder, Redis) queued for
        these chunks have ended; return how many of them still had one running then (0: none).
        A chunk with no queued write (never saved, already written) is not waited for."""

    def watch_pool(self, watcher: PoolWatcher) -> None:
        """watcher.mapped(region) for the DRAM pool in this process (now, and for each new mapping),
        watcher.unmapped(region) before one goes. A client with no pool here tells nothing."""
        return None

    def lendable_pool(self) -> PoolRegion | None:
        """The DRAM pool region borrow() lends slots of now (None: this client lends none)."""
        return None

    def borrow(self, keys: Sequence[bytes], lease_id: int | None = None) -> BorrowedChunks | None:
        """Pin `keys`' chunks in this client's DRAM pool for reads in place (after the lease's disk
        hits reached DRAM). None: this client cannot lend slots; load through load_layers."""
        return None

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessClient(StoreClient):
    """The embedded default: the TieredStore lives in this process."""

    _OWNER = 0

    def __init__(self, store: TieredStore, *, lease_timeout_s: float = 30.0, owns_store: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: the leases' clock (tests pass a fake one to let leases lapse)."""
        self.store = store
        self.lease_timeout_s = lease_timeout_s
        self._owns_store = owns_store
        self._host = StoreHost(store, clock=clock) if store.memory is not None else None
        self._key_bytes = get_hash_mode(store.config.hash_mode).key_bytes

    def _check_keys(self, keys: Sequence[bytes], name: str = "keys") -> list[bytes]:
        return check_keys(keys, self._key_bytes, self.hash_mode, name)

    @property
    def layout(self) -> KVLayout:
        return self.store.layout

    @property
    def chunk_tokens(self) -> int:
        return self.store.chunk_tokens

    @property
    def hash_mode(self) -> str:
        return self.store.config.hash_mode

    def lookup(self, keys: Sequence[bytes], lease: bool = False) -> LookupReply:
        keys = self._check_keys(keys)
        if self._host is None:
            r = self.store.lookup(keys)
            return LookupReply(r.hits, r.tiers, None)
        self._host.expire()
        hits, tiers, lease_id = self._host.lookup(self._OWNER, keys, lease, self.lease_timeout_s)
        return LookupReply(hits, tuple(tiers), lease_id)

    def load(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]], layers: Sequence[int] | None = None,
             lease_id: int | None = None) -> TransferHandle[LoadResult]:
        keys = self._check_keys(keys)
        layer_list, arrays = dest_arrays(self.layout, self.chunk_tokens, keys, dests, layers)
        if self._host is not None and lease_id is not None:
            self._host.wait_lease(lease_id, keys)  # these keys' disk hits are now in DRAM
        return self.store.load(keys, arrays, layer_list)

    def lendable_pool(self) -> PoolRegion | None:
        return self.store.memory.pool_region() if self.store.memory is not None else None

    def borrow(self, keys: Sequence[bytes], lease_id: int | None = None) -> BorrowedChunks | None:
        keys = self._check_keys(keys)
        if self.store.memory is None:
            return None
        if self._host is not None and lease_id is not None:
            self._host.wait_lease(lease_id, keys)  # these keys' disk hits are now in DRAM
        return _StoreBorrow(self.store, keys)

    def release(self, lease_id: int) -> None:
        if self._host is None:
            raise LeaseError(f"lease {lease_id} is not held (this store has no DRAM tier to pin in)")
        self._host.release(lease_id)

    def renew(self, lease_ids: Sequence[int]) -> list[int]:
        lease_ids = check_lease_ids(lease_ids)
        if self._host is None:
            return []  # nothing to renew: this store's lookups take no leases
        self._host.expire()  # (as lookup does: an in-process store has no reaper thread)
        return self._host.renew_leases(lease_ids, self.lease_timeout_s)

    def trim(self, lease_id: int, keys: Sequence[bytes]) -> None:
        keys = self._check_keys(keys)
        if self._host is None:
            raise LeaseError(f"lease {lease_id} is not held (this store has no DRAM tier to pin in)")
        self._host.trim(lease_id, keys)

    def save(self, keys: Sequence[bytes], parent: bytes, first_depth: int,
             srcs: Sequence[Sequence[Buffer]]) -> TransferHandle[SaveResult]:
        keys = self._check_keys(keys)
        self._check_keys([parent], "parent")
        check_save_args(self.layout, keys, first_depth, srcs)
        return self.store.save(keys, parent, first_depth, srcs)

    def begin_save(self, keys: Sequence[bytes], parent: bytes, first_depth: int) -> SaveSession:
        keys = self._check_keys(keys)
        self._check_keys([parent], "parent")
        check_save_args(self.layout, keys, first_depth)
        return self.store.begin_save(keys, parent, first_depth)

    def flush(self, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            self.store.flush()  # on the caller's thread, as long as it takes
        elif self._host is not None:
            self._host.flush(timeout_s)
        else:  # no DRAM tier, so no host: the store's own flush, whose bound is per write
            try:
                self.store.flush(timeout_s)
            except TimeoutError as e:
                raise FlushTimeoutError(f"disk writes were still running after {timeout_s} s: {e}") from None

    def wait_lower(self, keys: Sequence[bytes], timeout_s: float) -> int:
        keys = self._check_keys(keys)
        if self._host is None:
            return self.store.wait_lower(keys, timeout_s)
        return self._host.wait_lower(keys, timeout_s)

    def watch_pool(self, watcher: PoolWatcher) -> None:
        self.store.watch_pool(watcher)

    def stats(self) -> dict[str, Any]:
        return self._host.stats() if self._host is not None else self.store.stats()

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
        if self._owns_store:
            self.store.close()


def connect(config: ClientConfig | Mapping[str, Any] | str | PathLike[str] | None = None,
            layout: KVLayout | None = None) -> StoreClient:
    """A client for `config` (a ClientConfig, a mapping, or a config file).

    "inprocess" builds a TieredStore here and needs a layout (argument or config.layout).
    "service" connects to `kvtier serve` (starting it when auto_start is set); a layout
    given here must match the service's.
    """
    cfg = config if isinstance(config, ClientConfig) else load_config(ClientConfig, config)
    layout = layout or cfg.layout
    if cfg.mode == "service":
        from kvtier.client.service_client import ServiceClient

        return ServiceClient(cfg, layout)
    if layout is None:
        raise ConfigError("client.layout must be set for mode 'inprocess' (or pass layout= to connect)")
    return InProcessClient(TieredStore(cfg.store, layout), lease_timeout_s=cfg.lease_timeout_s)
