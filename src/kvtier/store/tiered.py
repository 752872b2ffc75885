"""TieredStore: the in-process store that composes tiers, fastest first.

Who calls: the client layer (in-process mode), the host service, tests and benchmarks.

    lookup(keys) -> LookupResult        leading chunks available, and in which tier
    load(keys, dests, layers) -> handle copy chunks (all layers or some) into caller buffers
    save(keys, parent, depth, srcs)     stage into DRAM now, write the disk tier in the background
    begin_save(keys, parent, depth)     the same, filled layer by layer (vLLM's save_kv_layer), or in
                                        place (slot_offsets / mark_filled: a GPU connector's direct saves)
    wait_lower(keys, timeout_s)         wait until these chunks' lower-tier writes have ended
    flush(), close()                    wait for pending disk writes

Buffers are plain buffer-protocol objects; `dests[i][j]` receives layer `layers[j]` of
chunk `keys[i]` (one section: [kv_heads, planes, chunk_tokens, head_size]).

Publishing: a chunk enters DRAM only when all its layers are filled (commit), and the
disk tier is written by one FIFO writer thread in chain order, parents before children;
if a parent's disk write fails its descendants in that save are not written. A chunk
whose parent is not on disk (the disk evicted it, DRAM still holds it) gets its missing
ancestors written first, or is not written. A chunk the disk tier refuses (no room without
cutting a chain, disk full) is reported in SaveResult.errors and counted; only an I/O
failure fails the save's handle. Keys, depths and layer sources are checked at the call. Chunks
being written to disk are pinned in DRAM so eviction cannot pull their bytes away, each
until its own write lands. When DRAM is full of such chunks, `allocate_memory` (the host
service's save and promotion path) waits for the writer to free some, up to
`write_wait_s`, instead of refusing the chunk: a burst of saves larger than DRAM is
slowed to disk speed, not dropped.
A disk hit is promoted to DRAM when the load read every layer.

Lower tiers (`config.lower_tiers`: further folders, Redis) sit below DRAM and the disk tier,
slowest last. A lookup asks them, batched, for the run of keys the tiers above lack (a
prefix stops at its first gap in every tier); a load reads the chunks the tiers above miss
from them in one batch per tier and promotes full-chunk hits to DRAM. Every save is written
to each of them (write-through, whatever write_mode says) by one more FIFO writer thread,
parents first, each chunk pinned in DRAM until its lower writes are done; a lower tier that
fails stops that chain in that tier only. As on disk, a chunk whose parent a lower tier lacks
(evicted there) gets its missing ancestors written there first, from DRAM, the write-back queue
or the disk tier; where none holds one, that tier's chain stops (it never gets an orphan).
`read_bandwidths()` reports each tier's measured read bandwidth. `wait_lower(keys)` waits for
the queued lower-tier writes of just those chunks
(a prefill instance answers a disaggregated request only once its chunks are in the shared
tiers the decode instance reads; connectors/vllm/pd.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.core import metrics as m
from kvtier.core.codec import CHECKSUM_AT_RELEASES_GIL, SECTION_KV, checksum, checksum_at
from kvtier.core.config import StoreConfig
from kvtier.core.errors import StoreClosedError
from kvtier.core.layout import KVLayout
from kvtier.store.transfer import TransferEngine, TransferHandle
from kvtier.tiers.base import (
    KEY_LENGTHS,
    Buffer,
    ChunkMeta,
    Tier,
    TierRefusedError,
    TierWriteError,
    as_bytes_view,
    check_chunk,
    check_key,
)
from kvtier.tiers.memory import ChunkEntry, MemoryTier, Reservation
from kvtier.tiers.pool import PoolWatcher, PoolWatchers

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class LookupResult:
    hits: int  # leading chunks available
    tiers: tuple[str, ...]  # tier name of each hit chunk


@dataclass(slots=True, frozen=True)
class LoadResult:
    loaded: int  # leading chunks loaded and verified
    failed: tuple[int, ...]  # indices (into keys) of chunks that could not be loaded
    tiers: tuple[str, ...]  # tier each chunk came from ("" for a failed one)


@dataclass(slots=True, frozen=True)
class SaveResult:
    chunks: int  # chunks in the save
    in_memory: int  # committed to the DRAM tier by this save (or already there)
    on_disk: int  # written to the disk tier (or already there)
    errors: tuple[str, ...] = field(default=())


class TieredStore:
    def __init__(
        self,
        config: StoreConfig,
        layout: KVLayout,
        *,
        metrics: m.Metrics | None = None,
        memory_pool: Buffer | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.chunk_tokens = config.chunk_tokens
        self.metrics = metrics or m.Metrics()
        self.layer_bytes = layout.layer_bytes(config.chunk_tokens)
        self.memory: MemoryTier | None = None
        self.disk: Tier | None = None
        if config.disk is not None:
            from kvtier.tiers.disk import DiskTier

            self.disk = DiskTier(layout, config.chunk_tokens, config.disk, self.metrics)
        try:  # the disk tier holds its folder's owner lock: a failure below must not keep it
            if config.memory is not None:
                on_evict = self._demote if (config.write_mode == "write-back" and self.disk) else None
                self.memory = MemoryTier(layout, config.chunk_tokens, config.memory, self.metrics,
                                         pool=memory_pool, on_evict=on_evict)
            self.tiers: list[Tier] = [t for t in (self.memory, self.disk) if t is not None]
            self.lower_tiers: list[Tier] = self._open_lower_tiers()
        except BaseException:
            for tier in (self.memory, self.disk):
                if tier is not None:
                    tier.close()
            raise
        # FIFO as well: each lower tier gets a chain's parents before its children
        self._lower_writer = TransferEngine(1, "kvtier-lower-writer") if self.lower_tiers else None
        self._io = TransferEngine(config.io_threads, "kvtier-io")
        self._writer = TransferEngine(1, "kvtier-disk-writer")  # FIFO: parents before children
        self._report_capacity()
        self._pending: set[TransferHandle] = set()
        self._lower_pending: dict[bytes, TransferHandle] = {}  # chunk -> its queued lower-tier write
        self._demoting: dict[bytes, tuple[ChunkMeta, list[bytes]]] = {}  # write-back chunks in flight
        self._pending_lock = threading.Lock()
        self._write_pins = 0  # DRAM chunks pinned until their disk write lands
        self._write_gen = 0  # bumped whenever the writer unpins one
        self._write_progress = threading.Condition()
        self.write_wait_s = 10.0  # longest allocate_memory waits for the writer to free a DRAM slot
        self._closed = False
        self._pool_watchers = PoolWatchers()
        self._verify: TransferEngine | None = None  # checksum threads (verify_borrowed, gather_here), started on first use
        self._pool_rows: Any = None  # gather_here's torch view of the DRAM pool, [sections of every slot, layer_bytes]

    def _report_capacity(self) -> None:
        """Each tier's counters at 0, and each local tier's capacity and fill as gauges, from
        the start (a networked tier's usage is its server's, asked only on request)."""
        for tier in self.tiers + self.lower_tiers:
            for name in m.TIER_COUNTERS:
                self.metrics.inc(name, 0, tier=tier.name)
            if tier is self.memory or hasattr(tier, "capacity_bytes"):
                u = tier.usage()
                self.metrics.set(m.CAPACITY_BYTES, u.capacity_bytes, tier=tier.name)
                self.metrics.set(m.USED_BYTES, u.used_bytes, tier=tier.name)

    def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve this store's metrics at http://host:port/metrics until close(); returns the
        bound port (0 picks a free one). A port in use raises MetricsPortInUseError naming it."""
        self._check_open()
        return self.metrics.serve(port, host)

    # -- lookup --------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], touch: bool = True) -> LookupResult:
        """How many leading `keys` are stored, and where. Hits are touched tail-first."""
        self._check_open()
        keys = _check_keys(keys)
        where: list[str] = []
        gap: tuple[int, str] = (-1, "")  # where the last lower run ended, and in which tier
        # lower tiers time their own batched lookups (lookup_lower)
        timer = m.RunTimer(self.metrics, m.LOOKUP_LATENCY, {t.name for t in self.tiers},
                           self.tiers[0].name if self.tiers else None)
        while True:
            for key in keys[len(where):]:
                if where and where[-1] != timer.tier:
                    timer.switch(where[-1])
                for tier in self.tiers:
                    if tier.contains(key):
                        where.append(tier.name)
                        break
                else:
                    if self._demoting:
                        with self._pending_lock:
                            demoting = key in self._demoting
                        if demoting:
                            where.append("disk")
                            continue
                    break
            start = len(where)
            timer.pause()
            skip = (gap[1],) if gap[0] == start else ()  # that tier just said it lacks keys[start]
            found = self.lookup_lower(keys, start, skip) if start < len(keys) else []
            if not found:
                break
            gap = (start + len(found), found[0])
            for key, lower_name in zip(keys[start:], found):  # name the tier a load would read
                where.append(next((t.name for t in self.tiers if t.contains(key)), lower_name))
        timer.observe()
        if touch and where:
            for tier in self.tiers + self.lower_tiers:
                hit = [k for k, w in zip(keys, where) if w == tier.name]
                if hit:
                    tier.touch(hit)
        return LookupResult(len(where), tuple(where))

    # -- load ----------------------------------------------------------------------
    def load(
        self,
        keys: Sequence[bytes],
        dests: Sequence[Sequence[Buffer]],
        layers: Sequence[int] | None = None,
    ) -> TransferHandle[LoadResult]:
        """Copy `layers` (default: all) of each chunk into dests[i][j]; runs on a worker thread."""
        layer_list = self._load_layers(keys, dests, layers)
        return self._io.submit("load", self._load_now, list(keys), dests, [layer_list] * len(keys))

    def _load_layers(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                     layers: Sequence[int] | None) -> list[int]:
        """The layers a load moves, after checking it has one destination buffer per chunk and layer."""
        self._check_open()
        _check_keys(keys)
        layer_list = list(range(self.layout.num_layers)) if layers is None else list(layers)
        if len(dests) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destination lists")
        for d in dests:
            if len(d) != len(layer_list):
                raise ValueError(f"each chunk needs {len(layer_list)} destination buffers, got {len(d)}")
        return layer_list

    def load_sync(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                  layers: Sequence[int] | None = None) -> LoadResult:
        return self.load(keys, dests, layers).wait()

    def load_here(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                  layers: Sequence[int] | None = None) -> LoadResult:
        """`load_sync` run in the calling thread: for a caller that would only wait (sparse decode's
        few changed blocks per layer), the hop to a worker and back costs more than the copies."""
        layer_list = self._load_layers(keys, dests, layers)
        return self._load_now(list(keys), dests, [layer_list] * len(keys))

    def load_here_each(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                       layers_each: Sequence[Sequence[int]]) -> LoadResult:
        """`load_here` where chunk i moves its own sections layers_each[i] into dests[i]: one call for
        a batch of (chunk, sections) pairs (sparse decode's newly selected (block, KV head) slices of
        one layer, each head wanting different blocks). A key may appear more than once."""
        self._check_open()
        _check_keys(keys)
        if not len(keys) == len(dests) == len(layers_each):
            raise ValueError(f"{len(keys)} keys, {len(dests)} destination lists and {len(layers_each)} layer lists")
        n_layers = self.layout.num_layers
        each: list[list[int]] = []
        for d, ls in zip(dests, layers_each):
            ls = list(ls)
            if len(d) != len(ls):
                raise ValueError(f"a chunk needs {len(ls)} destination buffers, got {len(d)}")
            if any(not 0 <= x < n_layers for x in ls):
                raise ValueError(f"layers {ls} outside 0..{n_layers - 1}")
            each.append(ls)
        return self._load_now(list(keys), dests, each)

    def gather_here(self, keys: Sequence[bytes], sections: Sequence[int] | np.ndarray, span: int,
                    out: np.ndarray) -> LoadResult:
        """Row i of `out` ([n, span * layer_bytes] uint8, C-contiguous) = sections sections[i] ..
        sections[i] + span - 1 of chunk keys[i] (consecutive, so one run of bytes in a chunk), each
        verified, in the calling thread. A key may appear more than once.

        For sparse decode, which reads hundreds of (block, KV head) slices per layer and step: the
        DRAM tier's hits are copied by one batched index_select out of its pool (its chunks pinned
        meanwhile) and checksummed row by row, where `load_here_each` pays a tier call per slice,
        several times the cost of its bytes. What DRAM lacks (or fails its checksum) is loaded as
        `load_here_each` does, from any tier."""
        self._check_open()
        _check_keys(keys)
        n, lb, n_layers = len(keys), self.layer_bytes, self.layout.num_layers
        secs = np.asarray(sections, dtype=np.int64)
        if secs.shape != (n,):
            raise ValueError(f"{n} keys but sections of shape {secs.shape}")
        if not 1 <= span <= n_layers:
            raise ValueError(f"span {span} outside 1..{n_layers}")
        if n and (secs.min() < 0 or secs.max() + span > n_layers):
            raise ValueError(f"sections {secs.min()}..{secs.max() + span - 1} outside 0..{n_layers - 1}")
        if out.dtype != np.uint8 or out.shape != (n, span * lb) or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {(n, span * lb)}, "
                             f"got {out.dtype} {out.shape}")
        mem = self.memory
        todo = list(range(n))
        if mem is not None and n:
            todo = self._gather_memory(mem, list(keys), secs, span, out)
        if todo:
            views = out.reshape(n, span, lb)
            res = self.load_here_each([keys[i] for i in todo], [list(views[i]) for i in todo],
                                      [range(secs[i], secs[i] + span) for i in todo])
            failed = tuple(todo[j] for j in res.failed)
        else:
            failed = ()
        self.count_served_chunks({"memory": n - len(todo)} if n > len(todo) else {})
        return LoadResult(failed[0] if failed else n, failed, ())

    def pool_rows(self) -> Any:
        """The DRAM pool as a torch uint8 tensor [slots x sections, layer_bytes] (row slot * sections +
        section), sharing its memory: gather_here's batched copies out of it."""
        if self._pool_rows is None:
            import torch

            assert self.memory is not None
            region = self.memory.pool_region()
            pool = np.ctypeslib.as_array((ctypes.c_ubyte * region.nbytes).from_address(region.address))
            self._pool_rows = torch.from_numpy(pool).view(-1, self.layer_bytes)
        return self._pool_rows

    def _gather_memory(self, mem: MemoryTier, keys: list[bytes], secs: np.ndarray, span: int,
                       out: np.ndarray) -> list[int]:
        """`gather_here`'s DRAM part: copies and verifies every row whose chunk is in DRAM; returns
        the rows still to load (absent, or a section failed its checksum)."""
        import torch

        lb, n_layers = self.layer_bytes, self.layout.num_layers
        n = len(keys)
        distinct = list(dict.fromkeys(keys))
        pinned = mem.pin_entries(distinct)  # one lock for the batch, not one pin and unpin per chunk
        try:
            entry_of = dict(zip(distinct, pinned))
            entries = [entry_of[key] for key in keys]
            hit_entries = [e for e in entries if e is not None]
            whole = len(hit_entries) == n
            hit = list(range(n)) if whole else [i for i, e in enumerate(entries) if e is not None]
            if not hit:
                return list(range(n))
            slots = np.fromiter((e.slot for e in hit_entries), dtype=np.int64, count=len(hit))
            rows = slots * n_layers + (secs if whole else secs[hit])
            idx = torch.from_numpy((rows[:, None] + np.arange(span)).reshape(-1))
            dest = torch.from_numpy(out)
            if whole:
                torch.index_select(self.pool_rows(), 0, idx, out=dest.view(-1, lb))
            else:
                dest[torch.tensor(hit)] = torch.index_select(self.pool_rows(), 0, idx).view(len(hit), -1)
            bad: list[int] = []
            if mem.config.verify_reads:
                firsts = secs.tolist()
                work = [(e.meta.checksums, firsts[i], i) for i, e in zip(hit, hit_entries)]
                parts = _VERIFY_THREADS if len(hit) * span * lb >= _VERIFY_PARALLEL_BYTES else 1
                if parts > 1 and CHECKSUM_AT_RELEASES_GIL:  # a large gather's checksums run on several cores
                    step = -(-len(work) // parts)
                    engine = self._verify_engine()
                    base = out.ctypes.data
                    for h in [engine.submit("verify", _failed_rows_at, base, span, lb, work[p : p + step])
                              for p in range(0, len(work), step)]:
                        bad.extend(h.wait())
                elif CHECKSUM_AT_RELEASES_GIL and threading.current_thread() is not threading.main_thread():
                    # a background reader (sparse decode's prefetcher) hashes without holding the GIL,
                    # so the forward's thread is not held up meanwhile
                    bad = _failed_rows_at(out.ctypes.data, span, lb, work)
                else:  # here: with checksums that hold the GIL, threads would only take turns
                    bad = _failed_rows(out.data.cast("B"), span, lb, work)
            mem.metrics.inc(m.HITS, len(hit) - len(bad), tier=mem.name)
            mem.metrics.inc(m.BYTES_READ, (len(hit) - len(bad)) * span * lb, tier=mem.name)
        finally:
            mem.release(pinned)
        if whole and not bad:
            return []
        done = set(hit).difference(bad)
        return [i for i in range(n) if i not in done]

    def _load_now(self, keys: list[bytes], dests: Sequence[Sequence[Buffer]],
                  layers_of: list[list[int]]) -> LoadResult:
        """Load sections layers_of[i] of chunk i into dests[i] (one list shared by every chunk for a plain load)."""
        tiers: list[str] = []
        failed: list[int] = []
        timer = m.BatchTimer(self.metrics, m.LOAD_LATENCY)
        for i, key in enumerate(keys):
            layers = layers_of[i]
            source = ""
            for tier in self.tiers:
                t0 = time.perf_counter()
                meta = tier.read(key, layers, dests[i])
                timer.add(tier.name, time.perf_counter() - t0)
                if meta is not None:
                    source = tier.name
                    if tier is not self.memory and self.memory is not None:
                        self._promote(meta, layers, dests[i])
                    break
            else:
                if self._demoting and self._read_demoting(key, layers, dests[i]) is not None:
                    source = "disk"
            tiers.append(source)
            if not source:
                failed.append(i)
        timer.observe()
        if failed and self.lower_tiers:
            groups: dict[tuple[int, ...], list[int]] = {}  # one lower-tier batch per distinct section list
            for i in failed:
                groups.setdefault(tuple(layers_of[i]), []).append(i)
            failed = sorted(j for ls, idx in groups.items() for j in self._load_lower(keys, dests, list(ls), idx, tiers))
        loaded = failed[0] if failed else len(keys)
        self.count_served(tiers)
        return LoadResult(loaded, tuple(failed), tuple(tiers))

    def count_served(self, sources: Sequence[str]) -> None:
        """Tokens loaded per source tier ("" = not loaded): one increment per tier per batch."""
        chunks: dict[str, int] = {}
        for source in sources:
            if source:
                chunks[source] = chunks.get(source, 0) + 1
        self.count_served_chunks(chunks)

    def count_served_chunks(self, chunks: dict[str, int]) -> None:
        """Tokens of `chunks[tier]` chunks loaded from each tier (the service's loads)."""
        for tier, n in chunks.items():
            self.metrics.inc(m.SERVED_TOKENS, n * self.chunk_tokens, tier=tier)

    # -- lower tiers ---------------------------------------------------------------
    def _open_lower_tiers(self) -> list[Tier]:
        from kvtier.tiers.lower import make_lower_tier

        opened: list[Tier] = []
        try:
            for spec in self.config.lower_tiers:
                opened.append(make_lower_tier(spec, self.layout, self.chunk_tokens, self.metrics))
        except BaseException:
            for tier in opened:
                tier.close()
            raise  # __init__ closes the DRAM and disk tiers
        return opened

    def lookup_lower(self, keys: Sequence[bytes], start: int = 0, skip: Sequence[str] = ()) -> list[str]:
        """The tier name of each of the leading keys from `start` that the first lower tier
        holding keys[start] has (one batched lookup per tier asked); [] if none holds it.
        `skip`: tiers known to lack keys[start] (the one whose run just ended there)."""
        rest = keys[start:]
        for tier in self.lower_tiers:
            if tier.name in skip:
                continue
            t0 = time.perf_counter()
            n = tier.lookup(rest)
            self.metrics.observe(m.LOOKUP_LATENCY, time.perf_counter() - t0, tier=tier.name)
            if n:
                return [tier.name] * n
        return []

    def read_lower(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> tuple[str, ChunkMeta] | None:
        """Read one chunk from the first tier below DRAM that has it (disk, then lower tiers)."""
        for tier in ([self.disk] if self.disk is not None else []) + self.lower_tiers:
            meta = tier.read(key, layers, dests)
            if meta is not None:
                return tier.name, meta
        return None

    def _load_lower(self, keys: list[bytes], dests: Sequence[Sequence[Buffer]], layers: list[int],
                    failed: list[int], tiers: list[str]) -> list[int]:
        """Fill the chunks the tiers above missed from the lower tiers, one batch per tier."""
        for tier in self.lower_tiers:
            if not failed:
                break
            t0 = time.perf_counter()
            metas = tier.read_many([keys[i] for i in failed], layers, [dests[i] for i in failed])
            self.metrics.observe(m.LOAD_LATENCY, time.perf_counter() - t0, tier=tier.name)
            still: list[int] = []
            for i, meta in zip(failed, metas, strict=True):
                if meta is None:
                    still.append(i)
                    continue
                tiers[i] = tier.name
                if self.memory is not None:
                    self._promote(meta, layers, dests[i])
            failed = still
        return failed

    def read_bandwidths(self) -> dict[str, float | None]:
        """Each tier's measured read bandwidth in GB/s (None before its first read), fastest tier first."""
        return {tier.name: tier.read_gbps() for tier in self.tiers + self.lower_tiers}

    def _queue_lower(self, metas: Sequence[ChunkMeta], copies: Sequence[list[bytes] | None],
                     in_memory: int) -> TransferHandle[SaveResult] | None:
        """Queue the lower-tier writes of a saved chain; each chunk's bytes stay pinned in DRAM
        (or are the save's own copies) until the writer is done with it."""
        if self._lower_writer is None or not metas:
            return None
        mem = self.memory
        pinned = [mem.pin_entry(meta.key) if copy is None and mem is not None else None
                  for meta, copy in zip(metas, copies, strict=True)]
        self._count_write_pins(sum(e is not None for e in pinned))
        handle = self._lower_writer.submit("save-lower", self._write_lower, list(metas), list(copies), pinned,
                                          in_memory)
        with self._pending_lock:
            for meta in metas:
                self._lower_pending[meta.key] = handle

        def _landed(h: TransferHandle) -> None:  # runs at once when the write already ended
            with self._pending_lock:
                for meta in metas:
                    if self._lower_pending.get(meta.key) is h:
                        del self._lower_pending[meta.key]

        handle.add_done_callback(_landed)
        self._track(handle, count_failures=False)  # a failed chain is logged; the lower tier counts its own
        return handle

    def wait_lower(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """Wait, at most `timeout_s`, until the lower-tier writes queued for `keys` have ended;
        return how many of `keys` still had one running then (0: every write ended).

        A key with no queued write (never saved here, already written, or a store without lower
        tiers) is not waited for. A write that ended in an error counts as ended: the lower tier
        counted and logged it, and a reader then finds the chunk missing, never half written.
        """
        if not timeout_s >= 0:  # NaN too
            raise ValueError(f"timeout_s must be a number of seconds >= 0, got {timeout_s!r}")
        keys = _check_keys(keys)
        with self._pending_lock:
            handles = {id(h): h for h in (self._lower_pending.get(k) for k in keys) if h is not None}
        deadline = time.monotonic() + timeout_s
        for h in handles.values():
            try:
                h.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except Exception:  # noqa: BLE001 - an ended write; its error went to the log and the tier's counters
                pass
        with self._pending_lock:
            running = [self._lower_pending.get(k) for k in keys]
        return sum(1 for write in running if write is not None and not write.done())

    def _write_lower(self, metas: list[ChunkMeta], copies: list[list[bytes] | None],
                     pinned: list[ChunkEntry | None], in_memory: int) -> SaveResult:
        mem = self.memory
        errors: list[str] = []
        try:
            sources: list[list[Buffer] | str] = []  # a chunk's layers, or why it has none
            for i in range(len(metas)):
                copy, entry = copies[i], pinned[i]
                if copy is not None:
                    sources.append(list(copy))
                elif entry is not None and mem is not None and not entry.condemned:
                    metas[i] = entry.meta  # the checksums of the bytes written: the resident chunk's
                    sources.append([mem.layer_view(entry.slot, layer) for layer in range(self.layout.num_layers)])
                elif entry is not None:  # a reader found its DRAM bytes corrupt: never written anywhere
                    sources.append("was found corrupt in DRAM before its write")
                else:  # left DRAM before the save queued it: the chain stops here
                    sources.append("was evicted from DRAM before its write")
            for tier in self.lower_tiers:
                batch_t0 = time.perf_counter()
                for i, meta in enumerate(metas):
                    src = sources[i]
                    if isinstance(src, str):
                        errors.append(f"{tier.name}: chunk {i} {src}")
                        break
                    t0 = time.perf_counter()
                    try:
                        # a chunk whose parent the tier lacks (evicted there, or never written to
                        # it) gets its missing ancestors first, as the disk tier does: a lower tier
                        # never holds a child it could not reach
                        if meta.depth > 0 and (i == 0 or meta.parent != metas[i - 1].key):
                            missing = self._write_ancestors(meta.parent, tier)  # asks the tier for the parent
                            if missing:
                                self.metrics.inc(m.WRITES_REFUSED, tier=tier.name)
                                errors.append(f"{tier.name}: chunk {i}: {missing}")
                                break
                        ok = tier.write(meta, src)
                    except (TierWriteError, OSError) as e:  # stops this tier's chain only, not the others'
                        self.metrics.inc(m.WRITE_FAILURES, tier=tier.name)
                        errors.append(f"{tier.name}: chunk {i}: {e}")
                        break
                    self.metrics.inc(m.WRITE_SECONDS, time.perf_counter() - t0, tier=tier.name)
                    if not ok:
                        errors.append(f"{tier.name}: chunk {i} not admitted (no room)")
                        break
                self.metrics.observe(m.SAVE_LATENCY, time.perf_counter() - batch_t0, tier=tier.name)
        finally:
            for i in range(len(metas)):
                self._unpin_written(pinned, i)
        if errors:
            raise TierWriteError(f"lower tiers: {len(errors)} chains stopped early: " + "; ".join(errors[:3]))
        return SaveResult(len(metas), in_memory, 0)

    def _promote(self, meta: ChunkMeta, layers: list[int], bufs: Sequence[Buffer]) -> None:
        if not self.config.promote_on_hit or self.memory is None or sorted(layers) != list(range(self.layout.num_layers)):
            return  # only a read of every layer (each once) has a whole chunk to promote
        if self.memory.contains(meta.key):
            return
        ordered = [bufs[layers.index(layer)] for layer in range(self.layout.num_layers)]
        self.memory.write(meta, ordered)

    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None:
        for tier in self.tiers + self.lower_tiers:
            data = tier.read_section(key, kind, index)
            if data is not None:
                return data
        return None

    # -- save ----------------------------------------------------------------------
    def begin_save(self, keys: Sequence[bytes], parent: bytes, first_depth: int = 0) -> SaveBatch:
        """Start a layer-by-layer save of the chain `keys` whose first chunk follows `parent`."""
        self._check_open()
        keys = list(_check_keys(keys))
        check_key(parent, "parent", KEY_LENGTHS)
        check_chunk(keys[0] if keys else parent, parent, first_depth, "keys[0]")
        return SaveBatch(self, keys, parent, first_depth)

    def save(
        self,
        keys: Sequence[bytes],
        parent: bytes,
        first_depth: int,
        srcs: Sequence[Sequence[Buffer]],
        extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None = None,
    ) -> TransferHandle[SaveResult]:
        """Save whole chunks: srcs[i][layer] holds layer `layer` of chunk keys[i].

        The DRAM copy happens before this returns, so the caller may reuse its buffers
        at once; the disk write completes in the background (wait on the handle).
        """
        if len(srcs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(srcs)} source lists")
        num_layers = self.layout.num_layers
        for i, chunk_srcs in enumerate(srcs):
            if len(chunk_srcs) != num_layers:
                raise ValueError(f"srcs[{i}] has {len(chunk_srcs)} layer buffers; the layout has {num_layers} layers")
        if extras is not None and len(extras) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(extras)} extras")
        batch = self.begin_save(keys, parent, first_depth)
        try:
            for layer in range(num_layers):
                batch.write_layer(layer, [s[layer] for s in srcs])
        except BaseException:
            batch.abort()  # a bad source buffer must not keep the DRAM slots taken for good
            raise
        return batch.commit(extras)

    def _metas(self, batch: SaveBatch, checksums: list[tuple[int, ...]],
               extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None) -> list[ChunkMeta]:
        metas = []
        parent = batch.parent
        for i, key in enumerate(batch.keys):
            metas.append(ChunkMeta(key, parent, batch.first_depth + i, self.chunk_tokens, checksums[i],
                                   extras[i] if extras else ()))
            parent = key
        return metas

    def _commit(self, batch: SaveBatch,
                extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None) -> TransferHandle[SaveResult]:
        mem = self.memory
        t0 = time.perf_counter()
        _check_extras(extras, len(batch.keys))  # before anything is published: a bad one failed only on disk
        for i, res in enumerate(batch.reservations):
            filled = len(res.filled) if res is not None else sum(1 for d in batch.copies[i] if d)
            if filled != self.layout.num_layers:
                raise ValueError(f"save of chunk {i}: {filled} of {self.layout.num_layers} layers written")
        checksums: list[tuple[int, ...]] = []
        copies: list[list[bytes] | None] = []
        slot_sums = batch.slot_checksums()  # computed as the sections were written (collected here)
        for i in range(len(batch.keys)):
            sums = slot_sums[i]
            if sums is not None:
                checksums.append(sums)
                copies.append(None)
            else:
                layers_data = batch.copies[i]
                checksums.append(tuple(checksum(d) for d in layers_data))
                copies.append(layers_data)
        metas = self._metas(batch, checksums, extras)
        pinned: list[ChunkEntry | None] = []
        try:
            for i, meta in enumerate(metas):
                res = batch.reservations[i]
                if res is not None and mem is not None:
                    # pinned as it is published: no eviction slips in before its disk write. Another
                    # writer may have stored the key first (its bytes may differ in their low bits):
                    # the resident entry is what is pinned, and its meta goes with its bytes below
                    pinned.append(mem.commit_pinned(res, meta)[1])
                else:
                    pinned.append(mem.pin_entry(meta.key) if mem is not None else None)
        except BaseException:
            if mem is not None:
                mem.release(pinned)
            raise
        in_memory = sum(e is not None for e in pinned)
        if mem is not None:
            mem.touch(batch.keys)
            self.metrics.observe(m.SAVE_LATENCY, time.perf_counter() - t0, tier=mem.name)
        # write-through: every chunk goes to disk; write-back: only those DRAM had no room for
        write_through = self.config.write_mode == "write-through"
        to_disk = [i for i in range(len(metas)) if self.disk is not None and (write_through or copies[i] is not None)]
        if mem is not None:
            mem.release([e for i, e in enumerate(pinned) if i not in to_disk])
        self._count_write_pins(sum(1 for i in to_disk if pinned[i] is not None))
        lower = self._queue_lower(metas, copies, in_memory)
        if not to_disk:
            return lower or self._io.completed("save", SaveResult(len(metas), in_memory, 0))
        handle = self._writer.submit("save", self._write_disk, [metas[i] for i in to_disk],
                                     [copies[i] for i in to_disk], [pinned[i] for i in to_disk], in_memory)
        self._track(handle)
        return handle

    def persist(self, metas: Sequence[ChunkMeta],
                pinned: Sequence[ChunkEntry | None] | None = None) -> TransferHandle[SaveResult]:
        """Queue the lower-tier write of chunks already committed to DRAM (the host service's
        save path: clients fill shared-memory slots, the service commits, then calls this).
        Resident chunks are pinned until written (each written with its resident entry's meta);
        a chunk no longer in DRAM is an error. `pinned[i]`: the entry the caller pinned for
        chunk i (MemoryTier.commit_pinned) and hands over, so the chunk cannot be evicted between
        its commit and its write."""
        self._check_open()
        mem = self.memory
        metas = list(metas)
        pins = list(pinned) if pinned is not None else [
            mem.pin_entry(meta.key) if mem is not None else None for meta in metas]
        in_memory = sum(e is not None for e in pins)
        lower = self._queue_lower(metas, [None] * len(metas), in_memory)
        if self.disk is None or self.config.write_mode == "write-back":
            if mem is not None:
                mem.release(pins)
            return lower or self._io.completed("save", SaveResult(len(metas), in_memory, 0))
        self._count_write_pins(in_memory)
        handle = self._writer.submit("save", self._write_disk, metas, [None] * len(metas), pins, in_memory)
        self._track(handle)
        return handle

    def _write_disk(self, metas: list[ChunkMeta], copies: list[list[bytes] | None],
                    pinned: list[ChunkEntry | None], in_memory: int) -> SaveResult:
        """The writer thread's part of a save: chunks to disk in chain order.

        A chunk the disk tier refuses (no room without cutting a chain, parent missing, disk
        full) ends the chain there and is reported in SaveResult.errors; only an I/O failure
        fails the handle. A chunk whose parent is not on disk (evicted from it while still in
        DRAM) gets its missing ancestors written first, so no child is ever on disk without them."""
        assert self.disk is not None
        disk = self.disk
        mem = self.memory
        written = 0
        errors: list[str] = []
        io_failed = False
        t0 = time.perf_counter()
        pinned = list(pinned)  # cleared as each chunk's pin is returned
        try:
            # the first failure stops the chain: a child is never written without its parent
            for i, meta in enumerate(metas):
                if disk.contains(meta.key):
                    written += 1
                    self._unpin_written(pinned, i)
                    continue
                if meta.depth > 0 and not disk.contains(meta.parent):
                    missing = self._write_ancestors(meta.parent)
                    if missing:
                        self.metrics.inc(m.WRITES_REFUSED, tier=disk.name)
                        errors.append(f"chunk {i}: {missing}")
                        break
                copy, entry = copies[i], pinned[i]
                if copy is not None:
                    layers: list[Buffer] = list(copy)
                elif entry is not None and entry.condemned:  # a reader found its DRAM bytes corrupt
                    self.metrics.inc(m.WRITES_REFUSED, tier=disk.name)
                    errors.append(f"chunk {i}: failed its checksum in DRAM before its disk write")
                    break
                elif entry is not None and mem is not None:
                    meta = entry.meta  # the checksums of the bytes written: the resident chunk's
                    layers = [mem.layer_view(entry.slot, layer) for layer in range(self.layout.num_layers)]
                else:
                    self.metrics.inc(m.WRITES_REFUSED, tier=disk.name)
                    errors.append(f"chunk {i}: evicted from DRAM before its disk write")
                    break
                try:
                    ok = disk.write(meta, layers)  # the tier counts its own write seconds
                except TierRefusedError as e:
                    errors.append(f"chunk {i}: {e}")
                    break
                except TierWriteError as e:
                    errors.append(f"chunk {i}: {e}")
                    io_failed = True
                    break
                if not ok:
                    errors.append(f"chunk {i}: refused by the disk tier (no room without evicting a chunk "
                                  "its chain or a write in flight needs, or not admitted by its policy)")
                    break
                written += 1
                self._unpin_written(pinned, i)  # at once: a slot for the next save
        finally:
            for i in range(len(metas)):
                self._unpin_written(pinned, i)
            self.metrics.observe(m.SAVE_LATENCY, time.perf_counter() - t0, tier=disk.name)
        result = SaveResult(len(metas), in_memory, written, tuple(errors))
        if io_failed:
            raise TierWriteError(
                f"disk tier: {len(metas) - written} of {len(metas)} chunks not written: " + "; ".join(errors[:3])
            )
        return result

    def _write_ancestors(self, parent: bytes, tier: Tier | None = None) -> str:
        """Write to `tier` (the disk tier by default) the ancestors of a chunk that are missing
        there (head first), from DRAM, the write-back queue or, for a lower tier, the disk tier;
        "" when done, else why the chunk cannot go to that tier."""
        target = tier if tier is not None else self.disk
        assert target is not None
        mem = self.memory
        disk = self.disk if self.disk is not target else None  # a source for the lower tiers
        if disk is not None:
            from kvtier.tiers.disk import DiskTier

            disk = disk if isinstance(disk, DiskTier) else None
        if target is self.disk:  # for the messages below
            here, into, by = "on disk", "disk", "the disk tier"
        else:
            here, into, by = f"in {target.name}", target.name, target.name
        missing: list[bytes] = []
        key = parent
        while not target.contains(key):
            meta = mem.meta(key) if mem is not None else None
            if meta is None:
                with self._pending_lock:
                    demoting = self._demoting.get(key)
                meta = demoting[0] if demoting is not None else None
            if meta is None and disk is not None:
                meta = disk.meta(key)
            if meta is None:
                elsewhere = "in DRAM" if disk is None else "in DRAM nor on disk"
                return f"its ancestor {key.hex()[:16]} is neither {here} nor {elsewhere}"
            missing.append(key)
            if meta.depth == 0:
                break
            key = meta.parent
        for key in reversed(missing):
            if target.contains(key):
                continue
            entry = mem.pin_entry(key) if mem is not None else None
            try:
                if entry is not None and not entry.condemned:
                    assert mem is not None
                    meta = entry.meta
                    layers: list[Buffer] = [mem.layer_view(entry.slot, layer) for layer in range(self.layout.num_layers)]
                else:
                    with self._pending_lock:
                        demoting = self._demoting.get(key)
                    if demoting is not None:
                        meta, layers = demoting[0], list(demoting[1])
                    elif disk is not None:
                        layers = [bytearray(self.layer_bytes) for _ in range(self.layout.num_layers)]
                        meta = disk.read(key, list(range(self.layout.num_layers)), layers)
                        if meta is None:
                            return f"its ancestor {key.hex()[:16]} left DRAM and disk before it could be written to {into}"
                    else:
                        return f"its ancestor {key.hex()[:16]} left DRAM before it could be written to {into}"
                assert meta is not None
                try:
                    ok = target.write(meta, layers)
                except TierRefusedError as e:
                    return f"its ancestor {key.hex()[:16]} was refused by {by}: {e}"
                if not ok:
                    return f"its ancestor {key.hex()[:16]} was refused by {by} (no room)"
            finally:
                if entry is not None and mem is not None:
                    mem.release([entry])
        return ""

    def _count_write_pins(self, n: int) -> None:
        if n:
            with self._write_progress:
                self._write_pins += n

    def _unpin_written(self, pinned: list[ChunkEntry | None], i: int) -> None:
        """Return the pin `persist`/`_commit` took on chunk i for its disk write (once)."""
        entry = pinned[i]
        if entry is None or self.memory is None:
            return
        pinned[i] = None
        self.memory.release([entry])
        with self._write_progress:
            self._write_pins -= 1
            self._write_gen += 1
            self._write_progress.notify_all()

    def allocate_memory(self, key: bytes, parent: bytes | None = None, depth: int = 0,
                        wait_s: float | None = None) -> Reservation | None:
        """A DRAM reservation for `key`; None when DRAM has no room.

        When every slot is taken by chunks pinned for queued disk writes, wait (up to
        `wait_s`, default `write_wait_s`) for the writer to release one: refusing would drop
        the chunk from both tiers, since a chunk that never reaches DRAM is never written.
        """
        mem = self.memory
        if mem is None:
            return None
        deadline: float | None = None
        while True:
            with self._write_progress:
                gen = self._write_gen
            res = mem.allocate(key, parent, depth)
            if res is not None:
                return res
            with self._write_progress:
                while self._write_gen == gen:
                    if self._write_pins <= 0:
                        return None  # nothing the writer holds: waiting would not free a slot
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + (self.write_wait_s if wait_s is None else wait_s)
                    if now >= deadline:
                        return None
                    self._write_progress.wait(deadline - now)

    def _demote(self, meta: ChunkMeta, payload: np.ndarray) -> None:
        """Write-back mode: a chunk leaving DRAM is copied and queued for the disk tier.

        The DRAM tier calls this outside its lock, while the slot is held for the allocation
        that evicted the chunk (so its bytes cannot change under the copy)."""
        if self.disk is None or self.disk.contains(meta.key):
            return
        lb = self.layer_bytes
        data = payload.tobytes()
        layers = [data[i * lb:(i + 1) * lb] for i in range(self.layout.num_layers)]
        mem = self.memory
        if mem is not None and mem.config.verify_reads and any(
                checksum(layer) != want for layer, want in zip(layers, meta.checksums, strict=True)):
            # the slot's bytes went bad in DRAM: served from this queue (_read_demoting) or written
            # to disk, they would be wrong KV under a good key. Dropped, as a failed read drops it.
            mem.metrics.inc(m.CHECKSUM_FAILURES, tier=mem.name)
            log.warning("kvtier: chunk %s failed its checksum as it left DRAM; dropped, not written to disk",
                        meta.key.hex()[:16])
            return
        with self._pending_lock:
            self._demoting[meta.key] = (meta, layers)  # readable until the disk write lands
        handle = self._writer.submit("demote", self._write_disk, [meta], [layers], [None], 0)
        self._track(handle)

        def _landed(_h: TransferHandle) -> None:
            with self._pending_lock:
                if self._demoting.get(meta.key, (None,))[0] is meta:
                    del self._demoting[meta.key]

        handle.add_done_callback(_landed)

    def _read_demoting(self, key: bytes, layers: list[int], dests: Sequence[Buffer]) -> ChunkMeta | None:
        with self._pending_lock:
            entry = self._demoting.get(key)
        if entry is None:
            return None
        meta, data = entry
        for layer, dest in zip(layers, dests):
            np.copyto(np.frombuffer(memoryview(dest).cast("B"), dtype=np.uint8), np.frombuffer(data[layer], dtype=np.uint8))
        return meta

    def _track(self, handle: TransferHandle, count_failures: bool = True) -> None:
        """Keep `handle` among the writes flush() waits for until it ends; log its error, and
        count it as a disk write failure (`count_failures`) unless the tier already did."""
        with self._pending_lock:
            self._pending.add(handle)

        def _done(h: TransferHandle) -> None:
            with self._pending_lock:
                self._pending.discard(h)
            exc = h.exception()
            if exc is not None:
                if count_failures and not isinstance(exc, TierWriteError):  # the tier counted its own failures
                    self.metrics.inc(m.WRITE_FAILURES, tier="disk")
                log.warning("kvtier: %s", exc)

        handle.add_done_callback(_done)

    # -- lifecycle -----------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every disk write queued so far has finished (errors are in their handles)."""
        with self._pending_lock:
            pending = list(self._pending)
        for h in pending:
            try:
                h.wait(timeout)
            except TimeoutError:
                raise
            except Exception:  # noqa: BLE001 - already reported through the handle and the log
                pass

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for tier in self.tiers + self.lower_tiers:
            u = tier.usage()
            out[tier.name] = {"used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes, "chunks": u.chunks,
                              "read_gbps": tier.read_gbps()}
        out["metrics"] = self.metrics.snapshot()
        return out

    # -- borrowed DRAM reads (a GPU connector copies straight out of the page-locked pool) ---------
    def borrow_memory(self, keys: Sequence[bytes]) -> list[Any]:
        """Pin each key's chunk in DRAM for reads in place (None where it is not in DRAM): its slot
        is `entry.slot` in pool_array(), chunk_bytes long, layer-major. Nothing evicts or reuses a
        borrowed slot until release_borrowed(); check each section read with verify_borrowed()
        before using the bytes."""
        self._check_open()
        _check_keys(keys)
        if self.memory is None:
            return [None] * len(keys)
        return list(self.memory.borrow(keys))

    def pool_array(self) -> np.ndarray:
        """The DRAM pool as one uint8 array (what borrowed slots index into)."""
        if self.memory is None:
            raise ValueError("this store has no DRAM tier")
        return self.memory.pool_array()

    def verify_borrowed(self, entries: Sequence[Any], layers: Sequence[int]) -> TransferHandle[LoadResult]:
        """Check sections `layers` of borrowed chunks against their checksums, on the store's verify
        threads (codec.checksum_at lets go of the GIL, so several groups verify at once). The result is a
        LoadResult over `entries`: a None entry (not borrowed) or a mismatch is failed."""
        self._check_open()
        memory = self.memory
        layer_list = list(layers)
        if any(not 0 <= x < self.layout.num_layers for x in layer_list):
            raise ValueError(f"layers {layer_list} outside 0..{self.layout.num_layers - 1}")

        def run() -> LoadResult:
            ok = [e is not None and memory is not None and memory.verify_borrowed(e, layer_list) for e in entries]
            failed = tuple(i for i, good in enumerate(ok) if not good)
            loaded = failed[0] if failed else len(entries)
            return LoadResult(loaded, failed, tuple("memory" if good else "" for good in ok))

        return self._verify_engine().submit("verify", run)

    def _verify_engine(self) -> TransferEngine:
        """The store's checksum threads (codec.checksum_at lets go of the GIL, so checks of a large read run on
        several cores): started on first use, as many as the I/O threads or up to 8 cores."""
        with self._pending_lock:
            if self._verify is None:
                threads = max(self.config.io_threads, min(8, os.cpu_count() or 1))
                self._verify = TransferEngine(threads, "kvtier-verify")
            return self._verify

    def release_borrowed(self, entries: Sequence[Any]) -> None:
        """End a borrow_memory(): the slots may be evicted or reused again (safe after close)."""
        if self.memory is not None:
            self.memory.release(entries)

    def watch_pool(self, watcher: PoolWatcher) -> None:
        """Tell `watcher` where the DRAM pool is (now) and when it goes (close): a GPU connector
        page-locks it (connectors/copy_engine.py). A store without a DRAM tier has no pool to tell of."""
        self._pool_watchers.add(watcher, self.memory.pool_region() if self.memory is not None else None)

    def close(self) -> None:
        if self._closed:
            return
        if self.config.write_mode == "write-back":
            self._write_back_resident()
        self.flush()
        self._closed = True
        if self.memory is not None:
            self._pool_watchers.unmapped(self.memory.pool_region())
        self.metrics.stop_serving()
        self._writer.shutdown()
        if self._lower_writer is not None:
            self._lower_writer.shutdown()
        self._io.shutdown()
        if self._verify is not None:
            self._verify.shutdown()
        for tier in self.tiers + self.lower_tiers:
            tier.close()

    def _write_back_resident(self) -> None:
        """Write-back: the chunks only DRAM holds go to disk as the store closes, parents first, as
        their eviction would have sent them (a clean close loses nothing that was saved; a crash
        loses what DRAM held, as it does in any write-back cache)."""
        mem, disk = self.memory, self.disk
        if mem is None or disk is None:
            return
        keep: list[ChunkEntry] = []
        drop: list[ChunkEntry] = []
        for e in mem.pin_entries(mem.keys()):
            if e is not None:
                (drop if e.condemned or disk.contains(e.meta.key) else keep).append(e)
        mem.release(drop)
        if not keep:
            return
        keep.sort(key=lambda e: e.meta.depth)  # a parent before its children
        self._count_write_pins(len(keep))
        self._track(self._writer.submit("write-back", self._write_disk, [e.meta for e in keep],
                                        [None] * len(keep), list(keep), len(keep)))

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")


# a save's section checksums are computed in jobs of about this many bytes on the verify threads
SAVE_CHECKSUM_JOB_BYTES = 32 << 20


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# gather_here verifies a batch of at least this many bytes on _VERIFY_THREADS threads, leaving a core
# to the caller (on 2 cores, threaded checks of a 340-slice sparse decode fill cost 1.1 ms more per
# layer than checking in the caller: scripts/profile_sparse_fill.py --drift 0.8); fewer than 2: here
_VERIFY_PARALLEL_BYTES = 4 << 20
_VERIFY_THREADS = min(4, _usable_cores() - 1)


def _failed_rows(out: memoryview, span: int, lb: int, work: Sequence[tuple[tuple[int, ...], int, int]]) -> list[int]:
    """Of the rows of `out` (a flat byte view; row i's `span` sections of `lb` bytes at i * span * lb),
    given as (the chunk's checksums, first section, row), those whose sections do not match their
    checksums (or whose chunk had none). Sections are hashed as slices of the memoryview: a decode
    step checks hundreds, and numpy row views cost ~2x the hashing itself."""
    bad = []
    for want, s0, row in work:
        if not want:
            bad.append(row)
            continue
        at = row * span * lb
        for j in range(s0, s0 + span):
            if checksum(out[at : at + lb]) != want[j]:
                bad.append(row)
                break
            at += lb
    return bad


def _failed_rows_at(base: int, span: int, lb: int, work: Sequence[tuple[tuple[int, ...], int, int]]) -> list[int]:
    """`_failed_rows` for rows laid out from address `base` (row i's `span` sections of `lb` bytes at
    base + i * span * lb), given as (checksums, first section, row), hashed by codec.checksum_at,
    which lets go of the GIL: what the store's verify threads run, so that they verify at once."""
    bad = []
    for want, s0, row in work:
        if not want:
            bad.append(row)
            continue
        at = base + row * span * lb
        for j in range(s0, s0 + span):
            if checksum_at(at, lb) != want[j]:
                bad.append(row)
                break
            at += lb
    return bad


def _slot_sums(mem: MemoryTier, slots: Sequence[int], first: int, span: int) -> list[list[int]]:
    """Checksums of sections first .. first + span - 1 of each slot, read from the pool."""
    lb = mem.layer_bytes
    return [[checksum_at(mem.layer_view(slot, first + j).ctypes.data, lb) for j in range(span)] for slot in slots]


def _check_keys(keys: Sequence[bytes], name: str = "keys") -> Sequence[bytes]:
    """`keys` as a list of chunk keys of one length, or ValueError naming the first bad one."""
    if isinstance(keys, (bytes, bytearray, str)):
        raise ValueError(f"{name} must be a sequence of keys, not one {type(keys).__name__}")
    if not isinstance(keys, (list, tuple)):
        keys = list(keys)  # an iterator is read once, here
    first = -1
    for i, key in enumerate(keys):
        if type(key) is not bytes or len(key) != first:
            check_key(key, f"{name}[{i}]", KEY_LENGTHS)
            if first < 0:
                first = len(key)
            elif len(key) != first:
                raise ValueError(f"{name}[{i}] has {len(key)} bytes but {name}[0] has {first}")
    return keys


def _check_extras(extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None, n: int) -> None:
    """ValueError naming the first extra section that cannot be stored beside a chunk's KV."""
    if extras is None:
        return
    if len(extras) != n:
        raise ValueError(f"{n} keys but {len(extras)} extras")
    for i, sections in enumerate(extras):
        for j, section in enumerate(sections):
            ok = isinstance(section, tuple) and len(section) == 3
            kind, index, data = section if ok else (None, None, None)
            if not (ok and type(kind) is int and type(index) is int and 0 <= kind <= 0xFFFF and kind != SECTION_KV
                    and 0 <= index <= 0xFFFF and isinstance(data, bytes)):
                raise ValueError(f"extras[{i}][{j}] must be (kind, index, bytes) with kind and index in 0..65535 "
                                 f"and kind not SECTION_KV ({SECTION_KV}), got {section!r:.80}")


class SaveBatch:
    """A chain of chunks being saved layer by layer; commit() publishes them in order.

    Each chunk gets a DRAM slot at once; when DRAM has no room, its layers are copied
    aside and the chunk goes to the disk tier only.

    The sections are written by write_layer / write_rows (copies into the slots), or in place by
    the caller (a GPU connector copies device -> page-locked pool at slot_offsets(), then calls
    mark_filled once the copies completed). Each write checksums what it wrote at once, so
    commit() only collects the checksums and publishes: it does not checksum a whole save on one
    thread. By default in the writing thread; with `checksum_threads = True` on the store's verify
    threads (codec.checksum_at lets go of the GIL), for a writer whose host threads are otherwise idle (a GPU
    connector: threads woken beside a CPU forward would take its cores). A checksum always reads
    the slot after its write, and a section written again is checksummed again (the later one wins).
    """

    def __init__(self, store: TieredStore, keys: list[bytes], parent: bytes, first_depth: int) -> None:
        self.store = store
        self.keys = keys
        self.parent = parent
        self.first_depth = first_depth
        mem = store.memory
        self.reservations: list[Reservation | None] = []
        self.copies: list[list[bytes]] = []
        self._done = False
        # (first section, span, chunks, handle of their checksums [chunk][section]), in write order
        self._sums: list[tuple[int, int, list[int], TransferHandle[list[list[int]]]]] = []
        self.checksum_threads = False
        prev = parent
        try:
            for i, key in enumerate(keys):
                res = mem.allocate(key, prev, first_depth + i) if mem is not None else None
                self.reservations.append(res)
                self.copies.append([b""] * store.layout.num_layers if res is None else [])
                prev = key
        except BaseException:
            self._abort_reservations()  # never keep slots taken for a batch the caller never sees
            raise

    def write_layer(self, layer: int, srcs: Sequence[Buffer]) -> None:
        """Copy layer `layer` of every chunk (srcs[i] for keys[i]); the caller may reuse srcs after."""
        if self._done:
            raise ValueError("write to a save batch that was committed or aborted")
        if len(srcs) != len(self.keys):
            raise ValueError(f"{len(self.keys)} chunks but {len(srcs)} layer buffers")
        num_layers = self.store.layout.num_layers
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is outside 0..{num_layers - 1}")
        mem = self.store.memory
        for i, src in enumerate(srcs):
            res = self.reservations[i]
            if res is not None and mem is not None:
                mem.write_layer(res, layer, src)
            else:
                view = as_bytes_view(src)
                if view.nbytes != self.store.layer_bytes:
                    raise ValueError(f"layer {layer} source has {view.nbytes} bytes, a section has "
                                     f"{self.store.layer_bytes}")
                self.copies[i][layer] = view.tobytes()
        self._checksum_later(layer, 1)

    def slot_offsets(self) -> list[int | None]:
        """Per chunk, where its DRAM slot starts in the store's pool_array() (chunk_bytes long, section
        j at offset + j * layer_bytes); None for a chunk without a slot (write it with write_layer or
        write_rows). What a caller copying in place (mark_filled) writes to."""
        if self._done:
            raise ValueError("slot_offsets of a save batch that was committed or aborted")
        chunk_bytes = self.store.layout.num_layers * self.store.layer_bytes
        return [res.slot * chunk_bytes if res is not None else None for res in self.reservations]

    def mark_filled(self, first: int, span: int) -> None:
        """Sections first .. first + span - 1 of every chunk were written in place at slot_offsets() by
        copies that have completed (never call it before: the checksums start now, over the slot's
        bytes). Every chunk must have a slot."""
        if self._done:
            raise ValueError("mark_filled of a save batch that was committed or aborted")
        self._check_sections(first, span)
        missing = [i for i, res in enumerate(self.reservations) if res is None]
        if missing:
            raise ValueError(f"chunks {missing[:8]} have no DRAM slot to fill in place; write them with write_layer")
        for res in self.reservations:
            assert res is not None
            res.filled.update(range(first, first + span))
        self._checksum_later(first, span)

    def slot_checksums(self) -> list[tuple[int, ...] | None]:
        """Per chunk with a slot, its section checksums (waiting for those still running; a section no
        write checksummed is checksummed here); None for a chunk without one. Raises what a checksum
        job raised."""
        mem = self.store.memory
        num_layers = self.store.layout.num_layers
        got: list[list[int | None]] = [[None] * num_layers for _ in self.reservations]
        for first, span, chunks, handle in self._sums:
            for i, done in zip(chunks, handle.wait()):
                got[i][first:first + span] = done
        out: list[tuple[int, ...] | None] = []
        for res, row in zip(self.reservations, got):
            if res is None or mem is None:
                out.append(None)
                continue
            out.append(tuple(s if s is not None else checksum(mem.layer_view(res.slot, j)) for j, s in enumerate(row)))
        return out

    def _checksum_later(self, first: int, span: int) -> None:
        """Checksum sections first .. first + span - 1 of every chunk with a slot (just written): now, or
        with checksum_threads in jobs of about SAVE_CHECKSUM_JOB_BYTES on the store's verify threads."""
        mem = self.store.memory
        chunks = [i for i, res in enumerate(self.reservations) if res is not None]
        if mem is None or not chunks:
            return
        if not self.checksum_threads:
            slots = [self.reservations[i].slot for i in chunks]  # type: ignore[union-attr]
            self._sums.append((first, span, chunks, self.store._io.completed("checksum",
                                                                            _slot_sums(mem, slots, first, span))))
            return
        step = max(1, SAVE_CHECKSUM_JOB_BYTES // (span * self.store.layer_bytes))
        engine = self.store._verify_engine()
        for k in range(0, len(chunks), step):
            part = chunks[k:k + step]
            slots = [self.reservations[i].slot for i in part]  # type: ignore[union-attr]
            self._sums.append((first, span, part, engine.submit("checksum", _slot_sums, mem, slots, first, span)))

    def _check_sections(self, first: int, span: int) -> None:
        num_layers = self.store.layout.num_layers
        for name, value in (("first", first), ("span", span)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if span < 1 or first < 0 or first + span > num_layers:
            raise ValueError(f"sections {first}..{first + span - 1} outside 0..{num_layers - 1}")

    def write_rows(self, first: int, span: int, data: np.ndarray) -> None:
        """`write_layer` of sections first .. first + span - 1 of every chunk at once: data[i] ([n chunks,
        span * layer_bytes] uint8, C-contiguous) holds chunk i's, in section order. A chunk with a DRAM
        slot takes one copy into the pool (a save of many small sections, e.g. sparse prefill's per-(layer,
        KV head) ones, costs a call and a copy per section otherwise)."""
        if self._done:
            raise ValueError("write to a save batch that was committed or aborted")
        lb, num_layers = self.store.layer_bytes, self.store.layout.num_layers
        n = len(self.keys)
        self._check_sections(first, span)
        if data.dtype != np.uint8 or data.shape != (n, span * lb) or not data.flags.c_contiguous:
            raise ValueError(f"data must be a C-contiguous uint8 array of shape {(n, span * lb)}, "
                             f"got {data.dtype} {data.shape}")
        mem = self.store.memory
        if mem is not None:
            # one memmove per chunk (its sections are one run in the slot): single-threaded on purpose, as
            # a background save must not take the cores of the forward it runs beside (a multi-threaded
            # torch copy here made a CPU prefill slower)
            pool = mem.pool_region().address
            src = data.ctypes.data
            run = span * lb
            for i, res in enumerate(self.reservations):
                if res is not None:
                    ctypes.memmove(pool + (res.slot * num_layers + first) * lb, src + i * run, run)
                    res.filled.update(range(first, first + span))
        for i, res in enumerate(self.reservations):
            if res is None:
                for j in range(span):
                    self.copies[i][first + j] = data[i, j * lb : (j + 1) * lb].tobytes()
        self._checksum_later(first, span)

    def commit(self, extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None = None) -> TransferHandle[SaveResult]:
        if self._done:
            raise ValueError("save batch already committed or aborted")
        self._done = True
        try:
            return self.store._commit(self, extras)
        except BaseException:
            self._abort_reservations()
            raise

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._abort_reservations()

    def _abort_reservations(self) -> None:
        mem = self.store.memory
        if mem is None:
            return
        for res in self.reservations:
            if res is not None:
                mem.abort(res)
