"""Worker side of the vLLM connector (each Worker process), free of vLLM imports.

Called by KVTierConnector's worker-role methods, in vLLM's step order:

    register(kv_caches, backend, num_blocks)   one layout adapter per layer (refuses what it cannot map)
    start_step(plan)                           this step's StepPlan from the scheduler
    start_loads()                              submit every load: one store load (all layers) per request
    wait_layer(name)                           wait until this layer of every load is in vLLM's pages
    save_layer(name)                           copy this layer of every chunk to save into the store's DRAM
    finish_step()                              wait for any load left, commit the saves (publish)
    take_failed_blocks()                       block ids whose load failed (vLLM recomputes them)
    take_compute_samples()                     (tokens, seconds) of the forwards without loads since the
                                               last call (timed from start_step to finish_step; CUDA
                                               events on a GPU): the scheduler's load planner
    shutdown()                                 flush disk writes, close

Loads are batched: one load per request covers every layer, so the service pins each
chunk once (load_begin), the client copies all its layer sections into vLLM's pages and
unpins once (load_end), and the lease is released once (a load per layer cost two
service round trips per layer, far more than the copies themselves). The client copies
layer by layer (StoreClient.load_layers), so wait_layer(layer i) waits only for layer i
while the rest load during the forward pass; the client's transfer threads run on the
CPUs vLLM left free (see connector.py), not on the cores of the forward pass, and a
wait_layer that finds its layer behind copies the rest of it itself. Adapters whose
load_target stages a chunk and copies it into place afterwards wait for the whole load at the
first layer instead (the GPU layouts do not: they are batched, below). A failed chunk (evicted after its lease
expired, corrupt, store gone) reports its block; blocks of a load whose store call failed
are all reported. Saves: write_layer copies each layer into the store's DRAM staging
during the forward pass and finish_step commits, so every chunk is published only with
all its layers, and a request's chunks in chain order across steps (parents first).
A prompt's partial last chunk (SaveSpec.last_valid) is saved from a copy of its block
whose rows after its tokens are zeroed (adapter.clear_tokens), never with what an earlier
request left there. Nothing is pending when a step ends, so vLLM may reuse or free blocks at once
(handle_preemptions has nothing to do).

Chunks smaller than a block (chunk_tokens < block_size; the CPU adapter only): a chunk's
rows are strided inside its block, and the store client copies into contiguous buffers,
so each layer of a load lands in a staging arena (one grow-only [chunks, section] buffer
per layer, reused across steps) and wait_layer(i) scatters layer i into vLLM's pages with
one adapter call once the client has it; the client meanwhile copies the next layers.
Saves gather each layer's chunks into one reused buffer (write_layer copies it at once).
A failed chunk reports its block.

Batched adapters (the GPU layouts FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION; adapter.batched):
loads stage too, in a [chunks, section] host arena per layer (page-locked when the cache is on
CUDA), and wait_layer(i) queues, on a load stream, one host -> device copy of layer i's rows and
one index_copy_ into the KV tensor, records that layer's event and makes the forward's stream wait
for it alone: no CPU wait for the GPU, no copy per block. Saves queue, on a save stream after the
layer's compute, one index_select of the layer's blocks and one device -> host copy into a
page-locked buffer; write_layer runs once that copy completes (on SaveCopies' worker thread on
CUDA, at once on the CPU) and the commit is queued behind the writes, so chunks are published once
their copies complete and the forward never waits for a save. A step's end makes the compute
stream wait for the save stream (GPU-side), so blocks vLLM reuses are not overwritten under a
copy still reading them. On a CPU cache the same calls run synchronously.

Direct loads (batched adapters and a client that lends its DRAM pool's slots, StoreClient.borrow:
the `kvtier serve` client's shared-memory mapping or an in-process store; on CUDA with that pool
page-locked; forced with direct_loads=True, which runs the same code on CPU tensors): a step's hits
are not copied into the arena at all. Their chunks are borrowed (pinned by the service or the store
against eviction), checked against their checksums on verify threads while the GPU copies them
straight out of the pool's slots on the load stream, in batches of about DIRECT_DEVICE_BYTES (one
copy per run of neighbouring slots, then one index_copy_ per layer into vLLM's pages), and handed
back at the step's end, once the last copy completed. The host does no copy of its own, so a load
runs at the pinned host -> device speed rather than at one CPU thread's memcpy. A chunk gone from
DRAM, failing its checksum, or copied after the service's pins expired is reported at the step's
end with its blocks zeroed, as for a staged load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from kvtier.client.api import BorrowedChunks, LayeredLoad, SaveSession, StoreClient, WholeLoad
from kvtier.connectors.copy_engine import (
    DIRECT_GROUP_BYTES,
    VERIFY_JOB_BYTES,
    DoneEvent,
    SaveCopies,
    SideStream,
    host_registry,
    page_lock_pool,
    pool_runs,
    staging_buffer,
)
from kvtier.connectors.vllm.layouts import BlockAdapter, UnsupportedLayoutError, make_adapter
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvtier.core.codec import SECTION_BLOCK_HASHES
from kvtier.core.errors import KVTierError
from kvtier.core.layout import KVLayout
from kvtier.service.protocol import LeaseError
from kvtier.store.planner import MIN_OBSERVED_CHUNKS
from kvtier.store.tiered import LoadResult
from kvtier.store.transfer import TransferHandle

log = logging.getLogger("kvtier.connectors.vllm")

STORE_ERRORS = (KVTierError, OSError)
DIRECT_DEVICE_BYTES = 256 << 20  # direct loads: device bytes of one batch of chunks copied out of the pool


def _chain(fns: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for f in fns:
            f()
    return run


@dataclass(slots=True)
class _LayerLoad:
    spec: LoadSpec
    load: LayeredLoad | None  # None: the submit itself failed
    finishers: list[Callable[[], None] | None]
    layerwise: bool  # False: wait for the whole load at the first layer (finishers copy chunks into place)
    staged: list[np.ndarray] | None = None  # sub-block chunks: per layer, [chunks, section] staging rows
    scattered: list[bool] = field(default_factory=list)  # per layer: staging copied into vLLM's pages
    row0: int = 0  # batched adapters: the first arena row of this load


@dataclass(slots=True)
class _DirectLoads:
    """A step's loads copied straight out of the store client's page-locked DRAM pool."""
    borrows: list[BorrowedChunks | None]  # per load spec (None: the borrow itself failed)
    checks: list[list[tuple[TransferHandle[LoadResult], int, int]]]  # per spec: (verify job, its chunks u0..u1)
    copy_error: str | None = None  # queueing a copy failed: every chunk of the step is failed
    last_event: Any = None  # the last copy out of the pool: the chunks are handed back after it


@dataclass(slots=True)
class _Save:
    spec: SaveSpec
    session: SaveSession | None
    failed: bool = False
    error: BaseException | None = None  # batched saves: what a write on the copy thread raised


@dataclass(slots=True)
class WorkerStats:
    loaded_chunks: int = 0
    failed_chunks: int = 0
    saved_chunks: int = 0
    direct_chunks: int = 0  # chunks loaded straight out of the store's pool (direct loads)
    tiers: dict[str, int] = field(default_factory=dict)
    # per request, since vLLM last took them (get_kv_connector_stats): for vLLM's /metrics
    load_seconds: list[float] = field(default_factory=list)
    save_seconds: list[float] = field(default_factory=list)


class WorkerSide:
    def __init__(self, link: StoreLink, layer_names: tuple[str, ...], layout: KVLayout, block_size: int,
                 chunk_tokens: int | None = None, direct_loads: bool | None = None) -> None:
        self.link = link
        # None: direct loads where they pay (a batched GPU layout, a client that lends its DRAM pool's slots,
        # that pool page-locked); True: wherever the layout is batched and the client lends (tests, on the CPU)
        self.direct_loads = direct_loads
        self.layer_names = layer_names
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.layout = layout
        self.block_size = block_size
        self.chunk_tokens = block_size if chunk_tokens is None else chunk_tokens
        self.sub_block = self.chunk_tokens != block_size
        self._arena: list[np.ndarray] = []  # sub-block loads: per layer, [chunks, section] staging
        self._save_buf = np.empty((0, layout.layer_bytes(self.chunk_tokens)), dtype=np.uint8)  # sub-block saves
        self.adapters: dict[str, BlockAdapter] = {}
        self.plan = StepPlan()
        self._loads: list[_LayerLoad] = []  # this step's loads until they are finished
        self._saves: list[_Save] = []
        self._failed_blocks: set[int] = set()
        self._step = 0  # steps started
        self._load_failed_at = -2  # the step in which a load last failed
        self._failed_steps = 0  # steps in which a load failed (the scheduler hears of each once)
        self.stats = WorkerStats()
        self._loads_started = self._saves_started = 0.0  # perf_counter when the step's loads/saves began
        self.batched = False  # the adapters move a layer's blocks with one index op (GPU layouts)
        self.device = torch.device("cpu")
        self._arena_t: list[torch.Tensor] = []  # batched loads: per layer, host [rows, section] (pinned on CUDA)
        self._arena_event: Any = DoneEvent()  # the last copy out of the arena: it is reused after that
        self._load_stream: SideStream | None = None
        self._save_stream: SideStream | None = None
        self._save_copies: SaveCopies | None = None
        self._pool_watched: StoreClient | None = None  # the client whose pool was page-locked
        self._layer_events: dict[int, Any] = {}  # batched loads: this step's copy event per layer
        self._load_stream_ordered = False  # the load stream waited for the compute stream this step
        self._direct_step: _DirectLoads | None = None  # this step's direct loads until they are finished
        self._timing: tuple[int, Any] | None = None  # (tokens, start mark) of this step's forward, when timed
        self._pending_timings: list[tuple[int, Any, Any]] = []  # CUDA: (tokens, start, end events) not done yet
        self._compute_samples: list[tuple[int, float]] = []  # (tokens, seconds) for take_compute_samples
        self._pool_t: tuple[tuple[int, int], torch.Tensor] | None = None  # the pool direct loads copy out of

    # -- setup ---------------------------------------------------------------------------
    def register(self, kv_caches: Mapping[str, Any], backend: str, num_blocks: int) -> None:
        missing = set(self.layer_names) - set(kv_caches)
        extra = set(kv_caches) - set(self.layer_names)
        if missing or extra:
            raise UnsupportedLayoutError(
                f"KV cache layers {sorted(kv_caches)[:4]}... do not match the model's attention layers "
                f"(missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]})")
        self.adapters = {name: make_adapter(backend, kv_caches[name], self.layout, num_blocks, self.block_size,
                                            self.chunk_tokens)
                         for name in self.layer_names}
        kinds = {a.batched for a in self.adapters.values()}
        devices = {kv_caches[name].device for name in self.layer_names}
        if len(kinds) > 1 or len(devices) > 1:
            raise UnsupportedLayoutError(f"KV cache layers on several devices {sorted(map(str, devices))} or "
                                         "with different layouts are not supported")
        self.device = devices.pop()
        self.batched = kinds.pop() and not self.sub_block
        if self.direct_loads and not self.batched:
            raise UnsupportedLayoutError(f"direct_loads=True needs a batched GPU layout (FLASH_ATTN, TRITON_ATTN, "
                                         f"FLEX_ATTENTION) with whole-block chunks, not {backend}")
        if self.batched:
            self._load_stream, self._save_stream = SideStream(self.device), SideStream(self.device)
            self._save_copies = SaveCopies(self.device)
        client = self._client()  # page-lock the store's pool now when the cache is on a GPU
        if self.direct_loads and client is not None and client.lendable_pool() is None:
            raise ValueError(f"direct_loads=True needs a store client that lends its DRAM pool's slots "
                             f"({type(client).__name__} lends none: no DRAM tier, or not connected)")

    def _client(self) -> StoreClient | None:
        """The link's client; on CUDA its DRAM pool is page-locked (once per client: a reconnect
        opens a new one) so the host side of every copy is pinned memory."""
        client = self.link.client()
        if client is not None and client is not self._pool_watched and self.device.type == "cuda":
            page_lock_pool(client, self.device)
            self._pool_watched = client
        return client

    # -- steps ---------------------------------------------------------------------------
    def start_step(self, plan: StepPlan | None) -> None:
        self._step += 1
        self.plan = plan if plan is not None else StepPlan()
        self._saves = []
        self._resolve_timings()
        self._timing = None
        tokens = self.plan.computed_tokens
        if not self.plan.loads and tokens >= MIN_OBSERVED_CHUNKS * self.chunk_tokens:
            # a forward without loads: its time per token is the load planner's compute cost
            self._timing = (tokens, self._mark())

    def _mark(self) -> Any:
        """A point in the forward's time: a CUDA event on the compute stream, else perf_counter."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def _end_timing(self) -> None:
        if self._timing is None:
            return
        tokens, start = self._timing
        self._timing = None
        end = self._mark()
        if isinstance(start, float):
            self._compute_samples.append((tokens, end - start))
        else:
            self._pending_timings.append((tokens, start, end))

    def _resolve_timings(self) -> None:
        """Turn the CUDA events of finished forwards into (tokens, seconds) samples."""
        while self._pending_timings and self._pending_timings[0][2].query():
            tokens, start, end = self._pending_timings.pop(0)
            self._compute_samples.append((tokens, start.elapsed_time(end) / 1e3))

    def take_compute_samples(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of forwards without loads since the last call: the scheduler's load
        planner weighs loading a stored chunk against computing its tokens with them."""
        self._resolve_timings()
        out, self._compute_samples = self._compute_samples, []
        return out

    def _fail_load(self, spec: LoadSpec, indices: list[int] | None = None) -> None:
        blocks = spec.block_ids if indices is None else [spec.block_ids[i] for i in indices]
        self._failed_blocks.update(blocks)
        if self._load_failed_at != self._step:
            self._load_failed_at = self._step
            self._failed_steps += 1

    def start_loads(self) -> None:
        """Submit this step's loads: one store load per request covering every layer.

        One load_begin/load_end pair per request (not per layer): the service pins the
        chunks once (disk hits were already promoted by the scheduler's lease), the
        client copies every layer's sections straight into vLLM's pages, layer by layer,
        and the lease is released once, after the forward pass.
        """
        if not self.plan.loads or self._loads or self._direct_step is not None:
            return
        self._loads_started = time.perf_counter()
        client = self._client()
        if client is not None and self._direct(client):
            self._start_direct_loads(client)
            return
        if self.sub_block or self.batched:
            self._start_staged_loads()
            return
        client = self._client()
        entries: list[_LayerLoad] = []
        for spec in self.plan.loads:
            per_layer = [self.adapters[name].load_targets(spec.block_ids) for name in self.layer_names]
            dests = [list(row) for row in zip(*(targets for targets, _ in per_layer), strict=True)]
            fins_by_chunk = zip(*(fins for _, fins in per_layer), strict=True)
            finishers = [_chain([f for f in fins if f is not None]) if any(fins) else None for fins in fins_by_chunk]
            layerwise = not any(finishers)
            load: LayeredLoad | None = None
            if client is not None:
                try:
                    load = (client.load_layers(spec.keys, dests, spec.lease_id) if layerwise
                            else WholeLoad(client.load(spec.keys, dests, None, spec.lease_id)))
                except STORE_ERRORS as e:
                    self.link.failed(e)
                    client = None
            entries.append(_LayerLoad(spec, load, finishers, layerwise))
        self._loads = entries

    def _direct(self, client: StoreClient) -> bool:
        """Whether this step's loads copy straight out of the client's DRAM pool (else through staging)."""
        if not self.batched or self.direct_loads is False or (self.direct_loads is None and self.device.type != "cuda"):
            return False
        region = client.lendable_pool()
        if region is None:
            return False
        # where it pays (None): copies out of a page-locked pool are asynchronous, out of a pageable one not
        return bool(self.direct_loads) or (region.address, region.nbytes) in host_registry().registered()

    def _pool_tensor(self, pool: np.ndarray) -> torch.Tensor:
        """`pool` as a host tensor (one per mapping: a service reconnect maps a new pool)."""
        where = (int(pool.ctypes.data), pool.nbytes)
        if self._pool_t is None or self._pool_t[0] != where:
            self._pool_t = (where, torch.from_numpy(pool))
        return self._pool_t[1]

    def _start_direct_loads(self, client: StoreClient) -> None:
        """Every load of the step straight out of the client's DRAM pool: the chunks are borrowed (no
        eviction reuses their slots), checked on verify threads while they are copied, and copied on
        the load stream in batches of about DIRECT_DEVICE_BYTES: one copy per run of neighbouring
        slots (a group of about DIRECT_GROUP_BYTES of layers per chunk, so usually whole chunks) into
        a device buffer, then one index_copy_ per layer into vLLM's pages. Each layer has its group's
        event; nothing waits on the CPU. A chunk not in DRAM or failing its checksum is reported
        failed at the step's end and its blocks zeroed (vLLM recomputes them)."""
        lay = self.layout
        n_layers = lay.num_layers
        lb = lay.layer_bytes(self.chunk_tokens)
        cb = n_layers * lb
        step = _DirectLoads([], [])
        self._direct_step = step
        self._layer_events = {}
        pieces: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}  # pool address -> (pool, blocks, slots)
        per_job = max(1, VERIFY_JOB_BYTES // cb)
        for spec in self.plan.loads:
            borrow: BorrowedChunks | None = None
            checks: list[tuple[TransferHandle[LoadResult], int, int]] = []
            try:
                borrow = client.borrow(spec.keys, spec.lease_id)
                if borrow is not None:
                    for u0 in range(0, len(spec.keys), per_job):
                        u1 = min(len(spec.keys), u0 + per_job)
                        checks.append((borrow.verify(u0, u1), u0, u1))
            except STORE_ERRORS as e:
                self.link.failed(e)
                checks = []
            step.borrows.append(borrow)
            step.checks.append(checks)
            if borrow is None or not checks:
                continue
            pool, blocks, slots = pieces.setdefault(int(borrow.pool.ctypes.data),
                                                    (self._pool_tensor(borrow.pool), [], []))
            for block, slot in zip(spec.block_ids, borrow.slots, strict=True):
                if slot >= 0:
                    blocks.append(block)
                    slots.append(slot)
        if not pieces:
            return
        assert self._load_stream is not None
        self._load_stream.run(lambda: None, after_compute=True)  # the last step may still read these blocks
        group = max(1, min(n_layers, -(-DIRECT_GROUP_BYTES // lb)))
        for g0 in range(0, n_layers, group):
            g1 = min(n_layers, g0 + group)
            span = (g1 - g0) * lb
            rows = max(1, DIRECT_DEVICE_BYTES // span)

            def place(g0: int = g0, g1: int = g1, span: int = span, rows: int = rows) -> None:
                for pool, blocks, slots in pieces.values():
                    for r0 in range(0, len(slots), rows):
                        part = slots[r0:r0 + rows]
                        buf = torch.empty((len(part), span), dtype=torch.uint8, device=self.device)
                        flat = buf.view(-1)
                        for row, off, n in pool_runs([(i, slot * cb + g0 * lb) for i, slot in enumerate(part)], span):
                            flat[row * span:(row + n) * span].copy_(pool[off:off + n * span], non_blocking=True)
                        for layer in range(g0, g1):
                            j = (layer - g0) * lb
                            self.adapters[self.layer_names[layer]].scatter_device(blocks[r0:r0 + rows],
                                                                                  buf[:, j:j + lb])

            try:
                _, event = self._load_stream.run(place)
            except RuntimeError as e:  # a CUDA error (or out of memory) queueing the copies: all recomputed
                step.copy_error = f"{type(e).__name__}: {e}"
                log.warning("kvtier: direct load copies failed (%s); vLLM recomputes those blocks", step.copy_error)
                break
            for layer in range(g0, g1):
                self._layer_events[layer] = event
            step.last_event = event

    def _finish_direct_loads(self, step: _DirectLoads) -> None:
        """Wait for the step's copies and checksum jobs, hand the borrowed chunks back, and report (and
        zero) every chunk that failed: absent, corrupt, not copied, or copied after its pins expired."""
        if step.last_event is not None:
            step.last_event.synchronize()  # the copies out of the pool are done: the slots may go back
        for spec, borrow, checks in zip(self.plan.loads, step.borrows, step.checks, strict=True):
            n = len(spec.keys)
            failed: set[int] = set()
            for handle, u0, u1 in checks:
                try:
                    failed.update(u0 + i for i in handle.wait().failed)
                except STORE_ERRORS as e:
                    self.link.failed(e)
                    failed.update(range(u0, u1))
            trusted = False
            if borrow is not None:
                try:
                    trusted = borrow.end()
                except STORE_ERRORS as e:
                    self.link.failed(e)
            if not trusted or not checks or step.copy_error is not None:
                failed = set(range(n))
            good = n - len(failed)
            if good:
                self.stats.tiers["memory"] = self.stats.tiers.get("memory", 0) + good
                self.stats.direct_chunks += good
            if failed:
                bad = sorted(failed)
                self._fail_load(spec, bad)
                self._clear_blocks([spec.block_ids[i] for i in bad])
            self._load_done(spec)

    def _staging(self, chunks: int) -> list[np.ndarray]:
        """Per layer, [chunks, section bytes] rows of the staging arena (grown, never shrunk).

        A new arena's pages fault in on the first load into it, so it is made twice the size
        asked for (untouched rows cost no memory): a slightly longer prompt next time must not
        pay those faults again.
        """
        section = self.layout.layer_bytes(self.chunk_tokens)
        have = self._arena[0].shape[0] if self._arena else 0
        if have < chunks:
            rows = max(2 * chunks, 2 * have)
            self._arena = [np.empty((rows, section), dtype=np.uint8) for _ in self.layer_names]
        return [a[:chunks] for a in self._arena]

    def _batched_arena(self, chunks: int) -> list[np.ndarray]:
        """Per layer, [chunks, section bytes] rows of the batched loads' host arena: page-locked on
        CUDA (grown by a quarter at a time there: pinning gigabytes twice over costs more than
        regrowing now and then), reused once the last copy out of it is done."""
        section = self.layout.layer_bytes(self.chunk_tokens)
        self._arena_event.synchronize()
        have = self._arena_t[0].shape[0] if self._arena_t else 0
        if have < chunks:
            rows = max(chunks + chunks // 4, 2 * have) if self.device.type == "cuda" else max(2 * chunks, 2 * have)
            self._arena_t = []  # the old arena goes before the new one is pinned
            self._arena_t = [staging_buffer(rows * section, self.device)[0].view(rows, section)
                             for _ in self.layer_names]
        return [t[:chunks].numpy() for t in self._arena_t]

    def _start_staged_loads(self) -> None:
        """Sub-block chunks and batched adapters: the client loads every layer into staging;
        wait_layer moves each layer into vLLM's pages once it is there."""
        client = self._client()
        total = sum(len(spec.keys) for spec in self.plan.loads)
        self._layer_events, self._load_stream_ordered = {}, False
        arena = self._batched_arena(total) if self.batched else self._staging(total)
        entries: list[_LayerLoad] = []
        row = 0
        for spec in self.plan.loads:
            n = len(spec.keys)
            staged = [a[row:row + n] for a in arena]
            row += n
            load: LayeredLoad | None = None
            if client is not None:
                try:
                    load = client.load_layers(spec.keys, [[s[i] for s in staged] for i in range(n)], spec.lease_id)
                except STORE_ERRORS as e:
                    self.link.failed(e)
                    client = None
            entries.append(_LayerLoad(spec, load, [None] * n, True, staged, [False] * len(self.layer_names), row - n))
        self._loads = entries

    def _scatter(self, entry: _LayerLoad, layer: int) -> None:
        if entry.staged is None or entry.scattered[layer] or entry.load is None:
            return
        entry.scattered[layer] = True
        spec = entry.spec
        adapter = self.adapters[self.layer_names[layer]]
        if not self.batched:
            adapter.scatter_chunks(spec.block_ids, spec.offsets, entry.staged[layer])
            return
        assert self._load_stream is not None
        rows = self._arena_t[layer][entry.row0:entry.row0 + len(spec.block_ids)]
        device = self.device
        if not self._load_stream_ordered:  # after the work already queued on the compute stream (the
            self._load_stream.run(lambda: None, after_compute=True)  # last step may still use these blocks)
            self._load_stream_ordered = True

        def place() -> None:  # one host -> device copy and one index_copy_ for the layer's blocks
            adapter.scatter_device(spec.block_ids, rows.to(device, non_blocking=True))

        _, event = self._load_stream.run(place)
        self._layer_events[layer] = event
        self._arena_event = event

    def wait_layer(self, name: str) -> None:
        """Return once layer `name` of every load of this step is in vLLM's pages."""
        if self._direct_step is not None:  # the forward's stream waits for this layer's copies (no CPU wait)
            event = self._layer_events.get(self.layer_index.get(name, -1))
            if event is not None and self._load_stream is not None:
                self._load_stream.wait(event)
            return
        if not self._loads:
            return
        layer = self.layer_index.get(name)
        if layer is not None and all(e.layerwise for e in self._loads):
            for entry in self._loads:
                if entry.load is not None:
                    entry.load.wait_layer(layer)
                    self._scatter(entry, layer)
                    if self.batched:
                        self._queue_ready_layers(entry, layer + 1)
            if self._load_stream is not None and layer in self._layer_events:
                self._load_stream.wait(self._layer_events[layer])  # the forward waits for this layer only
            return
        self._finish_loads()

    def _queue_ready_layers(self, entry: _LayerLoad, first: int) -> None:
        """Queue the copies of the layers from `first` on that the client already has in staging, so
        the copy of layer i+1 runs while layer i computes (each still has its own event)."""
        ready = getattr(entry.load, "layer_ready", None)
        if ready is None:
            return
        for layer in range(first, len(self.layer_names)):
            if entry.scattered[layer]:
                continue
            if not ready(layer):
                return
            self._scatter(entry, layer)

    def _finish_loads(self) -> None:
        """Wait for every load of the step; account failures, run finishers, release leases."""
        if self._direct_step is not None:
            step, self._direct_step = self._direct_step, None
            self._finish_direct_loads(step)
            return
        entries, self._loads = self._loads, []
        for entry in entries:
            spec = entry.spec
            failed: list[int] | None = None  # None: every chunk failed
            if entry.load is not None:
                try:
                    result = entry.load.wait()
                    failed = list(result.failed)
                    for t in result.tiers:
                        if t:
                            self.stats.tiers[t] = self.stats.tiers.get(t, 0) + 1
                except STORE_ERRORS as e:
                    self.link.failed(e)
            if entry.staged is not None and failed is not None:
                for layer in range(len(self.layer_names)):  # layers vLLM did not wait for
                    self._scatter(entry, layer)
            if failed is None:
                self._fail_load(spec)
                self._clear_blocks(spec.block_ids)
            else:
                if failed:
                    self._fail_load(spec, failed)
                    self._clear_blocks([spec.block_ids[i] for i in failed])
                bad = set(failed)
                for i, finish in enumerate(entry.finishers):
                    if finish is not None and i not in bad:
                        finish()
            self._load_done(spec)

    def _clear_blocks(self, blocks: list[int]) -> None:
        """Zero the blocks of failed chunks in every layer. A failed chunk was copied before its
        checksum failed (or the copy broke off): vLLM recomputes the prompt tokens of its block, but
        a chunk with the prompt's last token also reaches rows past the prompt's end, which the
        attention kernel reads masked, and masked NaNs still poison its output."""
        if self._load_stream is not None:
            self._load_stream.join()  # zeroed after every scatter queued on the load stream
        for block in dict.fromkeys(blocks):
            for adapter in self.adapters.values():
                adapter.clear_block(block)

    def _load_done(self, spec: LoadSpec) -> None:
        failed = sum(1 for b in spec.block_ids if b in self._failed_blocks)  # a failed chunk fails its block
        self.stats.failed_chunks += failed
        self.stats.loaded_chunks += len(spec.block_ids) - failed
        self.stats.load_seconds.append(time.perf_counter() - self._loads_started)
        if failed:
            log.warning("kvtier: load of %d of %d chunks failed for request %s; vLLM recomputes them",
                        failed, len(spec.block_ids), spec.req_id)
        if spec.lease_id is not None:
            client = self.link.client()
            if client is not None:
                try:
                    client.release(spec.lease_id)
                except LeaseError:
                    pass  # expired: the load already reported what it could not find
                except STORE_ERRORS as e:
                    self.link.failed(e)

    def save_layer(self, name: str) -> None:
        if not self.plan.saves:
            return
        adapter = self.adapters.get(name)
        if adapter is None:
            return
        if not self._saves:
            self._saves_started = time.perf_counter()
            client = self._client()
            for spec in self.plan.saves:
                session = None
                if client is not None:
                    try:
                        session = client.begin_save(spec.keys, spec.parent, spec.first_depth)
                    except STORE_ERRORS as e:
                        self.link.failed(e)
                        client = None
                self._saves.append(_Save(spec, session, failed=session is None))
        layer = self.layer_index[name]
        if self.batched:
            self._save_layer_batched(adapter, layer)
            return
        for save in self._saves:
            if save.failed or save.session is None:
                continue
            try:
                if self.sub_block:
                    n = len(save.spec.keys)
                    have = self._save_buf.shape[0]
                    if have < n:
                        self._save_buf = np.empty((max(2 * n, 2 * have), self._save_buf.shape[1]), dtype=np.uint8)
                    sections = adapter.gather_chunks(save.spec.block_ids, save.spec.offsets, self._save_buf[:n])
                    if save.spec.last_valid:
                        adapter.clear_tokens(sections[n - 1], save.spec.last_valid)
                    save.session.write_layer(layer, list(sections))
                else:
                    sources = [adapter.save_source(b) for b in save.spec.block_ids]
                    if save.spec.last_valid:  # a partial chunk: its tokens, zeros after (a copy, not vLLM's page)
                        sources[-1] = sources[-1].copy()
                        adapter.clear_tokens(sources[-1], save.spec.last_valid)
                    save.session.write_layer(layer, sources)
            except STORE_ERRORS as e:
                save.failed = True
                self.link.failed(e)

    def _save_layer_batched(self, adapter: BlockAdapter, layer: int) -> None:
        """One gather per save of this layer's blocks on the save stream (after the layer's compute),
        one device -> host copy into page-locked memory, and write_layer once the copy is done."""
        assert self._save_stream is not None and self._save_copies is not None
        for save in self._saves:
            if save.failed or save.session is None:
                continue
            spec, session = save.spec, save.session

            def gather(spec: SaveSpec = spec) -> torch.Tensor:
                sections = adapter.gather_device(spec.block_ids, spec.last_valid)
                if not sections.is_cuda:
                    return sections
                host = staging_buffer(sections.numel(), sections.device)[0].view(sections.shape)
                host.copy_(sections, non_blocking=True)
                return host

            try:
                host, event = self._save_stream.run(gather, after_compute=True)
            except RuntimeError as e:  # a CUDA error queueing the copy: this save is not published
                self._save_failed(save, e)
                continue

            def write(session: SaveSession = session, host: torch.Tensor = host) -> None:
                session.write_layer(layer, list(host.numpy()))

            self._save_copies.then(event, write, partial(self._save_failed, save))

    def _save_failed(self, save: _Save, e: BaseException) -> None:
        """A batched save's copy or write failed: it is aborted at commit, never half published."""
        save.failed = True
        save.error = e
        if isinstance(e, STORE_ERRORS):
            self.link.failed(e)
        else:
            log.warning("kvtier: save of request %s failed: %s: %s", save.spec.req_id, type(e).__name__, e)

    def _commit(self, save: _Save) -> None:
        if save.session is None:
            return
        try:
            if save.failed:
                save.session.abort()
                return
            sections = save.spec.block_hashes
            extras = None if sections is None else [((SECTION_BLOCK_HASHES, 0, data),) for data in sections]
            result = save.session.commit(extras).wait()
            self.stats.saved_chunks += result.in_memory
            if result.errors:  # not raised: a save the store could not keep is still a computed prefill
                log.warning("kvtier: save of request %s (%d chunks, %d stored in DRAM): %s", save.spec.req_id,
                            len(save.spec.keys), result.in_memory, "; ".join(result.errors)[:500])
            self.stats.save_seconds.append(time.perf_counter() - self._saves_started)
        except (ValueError, *STORE_ERRORS) as e:  # ValueError: a layer was never written
            log.warning("kvtier: save of request %s not published: %s", save.spec.req_id, e)
            if isinstance(e, STORE_ERRORS):
                self.link.failed(e)

    def finish_step(self) -> None:
        self._end_timing()
        self._finish_loads()
        if self._load_stream is not None:
            self._load_stream.join()
        failed_now = self._load_failed_at == self._step
        scheduled_blind = (self._load_failed_at == self._step - 1
                           and self.plan.load_failures_seen < self._failed_steps)
        if self._saves and (failed_now or scheduled_blind):
            # KV computed in this step may have attended over a failed load's blocks (zeroed, or
            # half copied): of the requests that loaded them, of any sharing them through vLLM's
            # prefix cache, and, with async scheduling, in the step scheduled before vLLM heard of
            # the failure and rolled them back. Published, it would stay under its key (the store
            # keeps a key's first copy) and be served. None of the step's saves is published; the
            # failed requests' chunks are saved again once recomputed (SchedulerSide.load_errors).
            log.warning("kvtier: a load failed in %s; its %d saves are dropped",
                        "this step" if failed_now else "the step before, and this one was scheduled before vLLM "
                        "heard of it", len(self._saves))
            for save in self._saves:
                save.failed = True
        for save in self._saves:
            if self._save_copies is None:
                self._commit(save)
            else:  # behind this save's writes: published once its copies completed
                self._save_copies.then(DoneEvent(), partial(self._commit, save), partial(self._save_failed, save))
        if self._save_stream is not None:
            self._save_stream.join()  # vLLM may reuse these blocks next step: after the gathers read them
        self._saves = []
        self.plan = StepPlan()

    def take_failed_blocks(self) -> set[int]:
        """The blocks whose loads failed, for this step's output. With speculative decoding vLLM
        asks before wait_for_save (finish_step runs after the drafter), so the step's loads are
        finished here: a failure must reach vLLM in the step it happened, or vLLM samples from
        the zeroed blocks and caches them as computed."""
        self._finish_loads()
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        client = self.link.client()
        if client is not None:
            try:
                client.flush()
            except STORE_ERRORS as e:
                log.warning("kvtier: flush at shutdown failed: %s", e)
        self.link.close()

