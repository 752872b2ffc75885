"""KVTierCache: a transformers DynamicCache pre-filled from the kvtier store, saved after prefill.

A Cache never sees token ids and `model(...)` does not slice `input_ids`, so the caller
states the contract (TransformersConnector.prefill and kvtier_generate do this for you):

    cache = connector.new_cache()
    plan = cache.prepare(input_ids, attention_mask=None)   # lookup, submit per-layer loads
    out = model(**plan.model_inputs(), **connector.cache_kwargs(cache))
    # out.logits[:, -1] is every row's last prompt token; the new full chunks are saved

prepare() looks up, per row, the longest stored prefix in whole chunks, never the last
token (the model must compute at least one position to produce logits), submits the
loads and returns at once; `plan.n_cached` columns are then in the cache and the model runs
on `plan.input_ids`. With one row, or rows that are unpadded and hit equally, that is
exactly `input_ids[:, plan.n_cached:]` and no mask or positions are needed.

Batches reuse per row. Row b of a left-padded batch has L_b prompt tokens of which h_b are
loaded. The cache holds W = max h_b columns before the forward, row b's loaded KV right-
aligned in them; the model runs q = max(L_b - h_b) columns with row b's uncached suffix
right-aligned, so every row's last token is the last column. The gaps are padding, masked by
`plan.attention_mask` (W + q columns), and `plan.position_ids` give each real token its
position in its own prompt; the output equals running each row alone.

Loading overlaps compute layer by layer: prepare() queues one load per layer (DRAM hits) or
whole-chunk loads (disk hits: one sequential read per chunk file, promoted to DRAM), and
layer i's `update` waits only for the loads layer i needs before it scatters them into
place. A chunk that fails to load (corrupt, evicted, its tier gone) is counted and logged
once, and that layer's update raises PrefixLoadError naming the verified prefix of each row;
the helpers then prepare again (capped to that prefix) and rerun, so the output is identical
to a recompute from the failed chunk on. `prepare(..., overlap=False)` instead waits for
every load and puts it in place inside prepare(), shortening the plan on a failure; the
forward then only computes.

prepare() loads only the leading stored chunks the connector's load planner finds worth
loading (kvtier.store.planner: load time from the tier's bandwidth against compute time from
the engine's measured throughput); the rest of a hit is recomputed with the suffix and shown
in `plan.skipped_tokens`. Where loading a prefix would take about as long as computing it (a slow
disk, a remote tier), `prepare(..., head=True)` (one row; the connector's prefill and generate)
may instead plan a head: the prefix's first chunks are computed by a forward of their own
(`plan.head_inputs()`) while the rest of it loads, so the hit costs about the longer of the two
rather than their sum (kvtier.store.planner.head_and_loads). The head's columns go first in each
layer's buffers, the loaded ones after them, then the suffix's. The staged layers reach the model's device through
copy_engine.LayerCopies: on a GPU, one asynchronous copy per layer on a load stream that
layer i's update makes the forward wait for (an event, not a CPU wait); a copy that fails is
a PrefixLoadError like a failed load, so those chunks are recomputed, never half-served.

After a layer has computed every column of the plan, its part of each new full chunk is
written to a store save (begin_save / write_layer); the last layer commits it. With the
connector's `direct_saves` (on CUDA with a page-locked DRAM pool; forced on the CPU in tests)
each group of layers (connector.save_group_layers, about DIRECT_GROUP_BYTES per chunk, like the
load groups) is gathered into one device buffer and copied straight into the chunks' reserved
DRAM slots (SaveBatch.slot_offsets: a chunk's layers are contiguous in its slot, so one copy
per chunk, and one per run of neighbouring slots when a group holds every layer), then marked
filled once the copy completed (mark_filled, which starts its checksums on the store's verify
threads). Publishing after the forward then costs the last group's copy and checksums, no host
copy and no checksum pass over the whole save; a failed copy aborts the whole save. Chunks already
stored, and chunks another row of the batch saves, are skipped. A failed save never fails
generation: it is counted and logged once by the connector.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvtier.connectors.copy_engine import VERIFY_JOB_BYTES, DoneEvent, LayerCopies, pool_runs
from kvtier.connectors.transformers.compat import DynamicCache, DynamicLayer, UnsupportedModelError
from kvtier.core.errors import KVTierError, LayoutMismatchError

if TYPE_CHECKING:
    from kvtier.connectors.transformers.connector import TransformersConnector

DISK_LOAD_GROUPS = 4  # whole-chunk disk loads are split in this many requests (parallel I/O threads)


class PrefixLoadError(KVTierError):
    """A planned chunk could not be loaded during the forward; prepare again capped to `valid_chunks`."""

    def __init__(self, message: str, valid_chunks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.valid_chunks = valid_chunks


@dataclass(slots=True, frozen=True)
class PrefillPlan:
    input_ids: torch.Tensor  # [B, q]: what the model runs
    attention_mask: torch.Tensor | None  # [B, W + q], None when no row needs padding
    position_ids: torch.Tensor | None  # [B, q], None when the model's defaults are right
    full_input_ids: torch.Tensor  # [B, W + q]: the cached columns then input_ids (for generate)
    prompt_tokens: tuple[int, ...]  # per row
    cached_tokens: tuple[int, ...]  # per row, loaded from the store
    n_cached: int  # W: columns the cache holds before the forward
    skipped_tokens: tuple[int, ...] = ()  # per row: stored, but recomputed because loading would not pay
    # prepare(head=True), one row: the stored prefix's leading tokens, computed by a forward of their
    # own (head_inputs()) while the rest of the prefix loads; then model_inputs() as usual
    head_input_ids: torch.Tensor | None = None  # [1, head]
    head_tokens: tuple[int, ...] = ()  # per row: stored, computed by the head forward (not in cached_tokens)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out

    def head_inputs(self) -> dict[str, torch.Tensor]:
        """The head forward's inputs (run before model_inputs()); {} when the plan has no head."""
        return {} if self.head_input_ids is None else {"input_ids": self.head_input_ids}

    @property
    def hit_ratio(self) -> float:
        total = sum(self.prompt_tokens)
        return sum(self.cached_tokens) / total if total else 0.0


@dataclass(slots=True)
class _RowSave:
    row: int
    keys: list[bytes]
    parent: bytes
    depth: int
    column: int  # cache column of the first saved token


@dataclass(slots=True)
class _Prefill:
    plan: PrefillPlan
    width: int  # W + q
    staging: list[torch.Tensor | None]  # per layer: uint8 [U, layer_bytes]
    layer_handles: list[list[Any]]  # per layer: the load handles it needs
    handle_units: dict[int, list[int]]  # id(handle) -> unique-chunk index of each of its keys
    handle_failed: dict[int, set[int]]  # id(handle) -> failed unique-chunk indices (once waited)
    row_units: list[list[int]]  # per row: unique-chunk index of each loaded chunk
    saves: list[_RowSave]
    head: int = 0  # columns the head forward computes (prepare(head=True)); loaded columns follow them
    row_first: list[int] = field(default_factory=list)  # per row: its first loaded chunk (after its head)
    batches: list[Any] | None = None
    saved_layers: int = 0
    save_broken: bool = False
    done_layers: int = 0
    load_wait_s: float = 0.0
    prepare_wait_s: float = 0.0  # the part of load_wait_s spent inside prepare (overlap=False)
    save_s: float = 0.0  # time the forward spent handing its new chunks to the store
    all_handles: list[Any] = field(default_factory=list)
    load_started: float = 0.0  # perf_counter when the loads were submitted
    done_at: dict[int, float] = field(default_factory=dict)  # id(handle) -> perf_counter when it finished
    tier_handles: dict[str, list[Any]] = field(default_factory=dict)  # tier -> its handles
    tier_bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes its handles move
    copies: Any = None  # LayerCopies: host -> device copies of the staged layers
    staging_buf: torch.Tensor | None = None  # the staging pool's buffer, until its copies are done
    save_buf: torch.Tensor | None = None  # the save pool's buffer (CUDA), until the saves are written
    save_offsets: list[list[int]] | None = None  # direct saves: per batch, its chunks' slots in the pool
    save_event: Any = None  # direct saves: the latest copy into the pool (waited for before an abort)
    # direct saves: (batch, first layer of a group) -> [its device buffer [chunks, layers, section], layers gathered]
    save_groups: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    # held while a layer's saves are queued and while a failure aborts them: no copy into a slot is
    # queued after the abort gave the slots back
    save_lock: threading.RLock = field(default_factory=threading.RLock)
    direct: bool = False  # DRAM chunks copied straight out of the store's pool (connector.direct_loads)
    borrowed: list[Any] | None = None  # direct: the store's borrowed entries, released once copied
    group_start: list[int] = field(default_factory=list)  # direct: per layer, the first layer of its group
    group_bufs: dict[int, torch.Tensor | None] = field(default_factory=dict)  # direct: group -> device copy


class _StoreLayer(DynamicLayer):
    """A DynamicLayer whose first update after prepare() installs the loaded prefix."""

    def __init__(self, cache: KVTierCache, index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index
        self.fill: int | None = None  # columns in place while a planned prefill runs
        self.head_end = 0  # while the head forward runs: the columns it computes (0 once done, or no head)
        self.installed = False
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fill is None:
            return super().update(key_states, value_states)
        return self.cache._update_planned(self, key_states, value_states)

    def get_seq_length(self) -> int:
        if self.fill is not None:
            return self.fill
        return super().get_seq_length()

    def clear(self) -> None:
        self.keys = self.values = None
        self.kbuf = self.vbuf = None
        self.is_initialized = False
        self.fill = None
        self.head_end = 0
        self.installed = False


class KVTierCache(DynamicCache):
    """One request's (or one batch's) cache, bound to a TransformersConnector."""

    def __init__(self, connector: TransformersConnector) -> None:
        super().__init__()
        self.connector = connector
        self._store_layers = [_StoreLayer(self, i) for i in range(connector.layout.num_layers)]
        self.layers = list(self._store_layers)
        self._state: _Prefill | None = None
        self._janitor: Any = None  # weakref.finalize: a prefill dropped mid-way gives back what it holds
        self.last_plan: PrefillPlan | None = None
        self.load_wait_s = 0.0  # time the forward waited for loads and scattered them (last prefill)
        self.forward_wait_s = 0.0  # the part of load_wait_s spent inside the forward (not in prepare)
        self.forward_save_s = 0.0  # time the last prefill's forward spent saving

    # -- prepare -------------------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                max_chunks: Sequence[int] | None = None, overlap: bool | None = None,
                head: bool = False) -> PrefillPlan:
        """Look up each row's stored prefix, queue its loads, and return what the model must run.

        `max_chunks` caps each row's loaded chunks (after a PrefixLoadError); with
        `overlap=False` (default: the connector's setting) every load is waited for here and a
        failed chunk shortens the plan instead of raising later.

        `head=True` (one row, overlap on; the connector's prefill and generate pass it) lets the
        load planner split the stored prefix where loading all of it would be slow: its leading
        chunks are then computed by a forward of their own while the rest loads
        (planner.head_and_loads). Such a plan has `head_input_ids`: run the model on
        plan.head_inputs() first, then on plan.model_inputs(), both with this cache.
        """
        conn = self.connector
        overlap = conn.overlap if overlap is None else overlap
        self.discard()
        conn.refresh_identity()  # weights modified since they were fingerprinted get keys of their own
        self.forward_wait_s = self.forward_save_s = 0.0
        ids, mask = _check_inputs(input_ids, attention_mask)
        batch, total = ids.shape
        lengths = [total] * batch if mask is None else [int(x) for x in mask.sum(1).tolist()]
        rows = [ids[b, total - n:].tolist() for b, n in enumerate(lengths)]
        ct = conn.chunk_tokens
        keys = [conn.chunk_keys(r) for r in rows]
        found = [conn.lookup(k) for k in keys]
        load_n = []
        head_n = []
        skipped = []
        with_head = head and overlap and batch == 1
        for b, n in enumerate(lengths):
            cap = (n - 1) // ct if n else 0  # never the last token
            if max_chunks is not None:
                cap = min(cap, max_chunks[b])
            usable = min(found[b][0], cap) if conn.load_enabled else 0
            if with_head:
                first, worth = conn.head_and_loads(found[b][1][:usable])
            else:
                first, worth = 0, conn.chunks_worth_loading(found[b][1][:usable])
            head_n.append(first)
            load_n.append(worth)
            skipped.append((usable - worth) * ct)
        if any(skipped):
            conn.report_skipped_loads(sum(skipped) // ct)
        plan = _make_plan(ids, lengths, [n * ct for n in load_n], conn.pad_token_id, conn.device, skipped,
                          [n * ct for n in head_n])
        self.last_plan = plan
        width = plan.full_input_ids.shape[1]
        if width == 0:
            return plan
        state = self._start_loads(plan, keys, found, load_n, width, head_n)
        self._state = state
        self._track_prefill(state)
        for layer in self._store_layers:
            layer.fill = 0 if state.head else plan.n_cached
            layer.head_end = state.head
        if not overlap:
            failed = set()
            for handles in state.layer_handles:
                for h in handles:
                    failed |= self._wait(state, h)
            if failed:
                valid = _valid_chunks(state, failed)
                return self.prepare(input_ids, attention_mask, max_chunks=valid, overlap=False)
            for layer in self._store_layers:  # everything is here: put it in place now, the forward only computes
                self._install(state, layer)
            state.prepare_wait_s = state.load_wait_s
        return plan

    def _start_loads(self, plan: PrefillPlan, keys: list[list[bytes]], found: list[tuple[int, tuple[str, ...]]],
                     load_n: list[int], width: int, head_n: list[int]) -> _Prefill:
        conn = self.connector
        layout = conn.layout
        index: dict[bytes, int] = {}
        unit_keys: list[bytes] = []
        unit_tier: list[str] = []
        row_units: list[list[int]] = []
        for b, n in enumerate(load_n):
            units = []
            for c in range(head_n[b], n):
                k = keys[b][c]
                if k not in index:
                    index[k] = len(unit_keys)
                    unit_keys.append(k)
                    unit_tier.append(found[b][1][c])
                units.append(index[k])
            row_units.append(units)
        n_units = len(unit_keys)
        lb = layout.layer_bytes(conn.chunk_tokens)
        if n_units and conn.direct_loads and all(t == "memory" for t in unit_tier):
            state = self._start_direct(plan, keys, found, width, unit_keys, row_units)
            state.head, state.row_first = max(plan.head_tokens, default=0), list(head_n)
            return state
        per_layer = n_units * lb
        buf = conn.staging_pool.acquire(per_layer * layout.num_layers) if n_units else None
        staging: list[torch.Tensor | None] = [
            (buf[i * per_layer:(i + 1) * per_layer] if buf is not None else torch.empty(0, dtype=torch.uint8))
            .view(n_units, lb) for i in range(layout.num_layers)]
        arrays = [s.numpy() for s in staging if s is not None]
        state = _Prefill(plan, width, staging, [[] for _ in range(layout.num_layers)], {}, {}, row_units,
                         self._plan_saves(plan, keys, found, width), max(plan.head_tokens, default=0), list(head_n))
        state.copies = LayerCopies(conn.device, conn.load_stream)
        state.staging_buf = buf
        if n_units == 0:
            return state
        store = conn.store
        disk_units = [u for u in range(n_units) if unit_tier[u] != "memory"]
        mem_units = [u for u in range(n_units) if unit_tier[u] == "memory"]
        shared = []
        state.load_started = time.perf_counter()
        if disk_units:  # whole chunks: one sequential read per file, promoted to DRAM
            step = -(-len(disk_units) // DISK_LOAD_GROUPS)
            for g in range(0, len(disk_units), step):
                group = disk_units[g:g + step]
                dests = [[a[u] for a in arrays] for u in group]
                h = store.load([unit_keys[u] for u in group], dests, None)
                state.handle_units[id(h)] = group
                shared.append(h)
            state.tier_handles["disk"] = list(shared)
            state.tier_bytes["disk"] = len(disk_units) * lb * layout.num_layers
        if mem_units:
            state.tier_handles["memory"] = []
            state.tier_bytes["memory"] = len(mem_units) * lb * layout.num_layers
        for layer in range(layout.num_layers):
            state.layer_handles[layer].extend(shared)
            if mem_units:
                a = arrays[layer]
                h = store.load([unit_keys[u] for u in mem_units], [[a[u]] for u in mem_units], [layer])
                state.handle_units[id(h)] = mem_units
                state.layer_handles[layer].append(h)
                state.tier_handles["memory"].append(h)
        state.all_handles = [h for hs in state.layer_handles for h in hs]
        for h in dict.fromkeys(state.all_handles):  # when each load finished, for the planner's bandwidths
            _stamp_done(state, h)
        return state

    def _start_direct(self, plan: PrefillPlan, keys: list[list[bytes]], found: list[tuple[int, tuple[str, ...]]],
                      width: int, unit_keys: list[bytes], row_units: list[list[int]]) -> _Prefill:
        """A prefix wholly in DRAM, copied straight out of the store's pool (connector.direct_loads):
        the chunks are borrowed (no eviction reuses their slots), each group of layers is one batch
        of copies from their slots on the load stream (one event) and one checksum job on the
        store's verify threads (a few jobs per group); layer i's update waits for its group's copy
        event and checks only."""
        conn = self.connector
        layout = conn.layout
        store = conn.store
        n_layers = layout.num_layers
        lb = layout.layer_bytes(conn.chunk_tokens)
        cb = conn.chunk_bytes
        state = _Prefill(plan, width, [None] * n_layers, [[] for _ in range(n_layers)], {}, {}, row_units,
                         self._plan_saves(plan, keys, found, width))
        state.copies = LayerCopies(conn.device, conn.load_stream)
        state.direct = True
        state.load_started = time.perf_counter()
        entries = store.borrow_memory(unit_keys)  # a chunk evicted since the lookup is None: failed below
        state.borrowed = entries
        pool = conn.pool_tensor()
        units = list(range(len(unit_keys)))
        state.tier_handles["memory"] = []
        state.tier_bytes["memory"] = len(unit_keys) * cb
        group = conn.load_group_layers
        for g0 in range(0, n_layers, group):
            g1 = min(n_layers, g0 + group)
            span = (g1 - g0) * lb
            checks = []  # a few jobs per group, so the first group's layers are checked by several threads at once
            step = max(1, VERIFY_JOB_BYTES // span)
            for u0 in range(0, len(entries), step):
                check = store.verify_borrowed(entries[u0:u0 + step], range(g0, g1))
                state.handle_units[id(check)] = units[u0:u0 + step]
                checks.append(check)
            state.tier_handles["memory"].extend(checks)
            # whole chunks (one group of every layer): neighbouring slots are one piece
            runs = pool_runs([(u, e.slot * cb + g0 * lb) for u, e in enumerate(entries) if e is not None], span)
            pieces = [(row, pool[off:off + n * span]) for row, off, n in runs]
            state.group_bufs[g0] = state.copies.gather(range(g0, g1), pieces, len(unit_keys), span)
            for layer in range(g0, g1):
                state.group_start.append(g0)
                state.layer_handles[layer].extend(checks)
        state.all_handles = [h for hs in state.layer_handles for h in hs]
        for h in dict.fromkeys(state.all_handles):  # when each check finished, for the planner's bandwidths
            _stamp_done(state, h)
        return state

    @staticmethod
    def _release_borrowed(conn: TransformersConnector, state: _Prefill) -> None:
        """Hand the borrowed chunks back once every copy out of their slots has completed (on CUDA
        on the save-copy worker after the last copy's event; on the CPU at once)."""
        entries, state.borrowed = state.borrowed, None
        if not entries:
            return
        store = conn.store
        event = state.copies.last_event if state.copies is not None and state.copies.last_event else _DONE

        def failed(e: BaseException) -> None:
            conn._log_once("release", "kvtier: releasing borrowed DRAM chunks failed: %s", e)

        conn.save_copies.then(event, lambda: store.release_borrowed(entries), failed)

    def _plan_saves(self, plan: PrefillPlan, keys: list[list[bytes]], found: list[tuple[int, tuple[str, ...]]],
                    width: int) -> list[_RowSave]:
        conn = self.connector
        if not conn.save_enabled:
            return []
        ct = conn.chunk_tokens
        seen: set[bytes] = set()
        saves = []
        for b, row_keys in enumerate(keys):
            start = found[b][0]
            while start < len(row_keys) and row_keys[start] in seen:  # another row saves it (a shared prefix)
                start += 1
            if start >= len(row_keys):
                continue
            parent = row_keys[start - 1] if start else conn.root
            column = width - plan.prompt_tokens[b] + start * ct
            saves.append(_RowSave(b, row_keys[start:], parent, start, column))
            seen.update(row_keys[start:])
        return saves

    # -- forward -------------------------------------------------------------------------------
    def _update_planned(self, layer: _StoreLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._state
        assert state is not None and layer.fill is not None
        if layer.head_end:
            return self._update_head(state, layer, k, v)
        if not layer.installed:
            self._check_states(state, layer, k, v)
            self._install(state, layer)
        assert layer.kbuf is not None and layer.vbuf is not None
        n = k.shape[-2]
        start = layer.fill
        end = start + n
        if end > state.width:
            raise ValueError(f"layer {layer.index}: the forward after prepare() brought {end - state.plan.n_cached} "
                             f"new tokens; the plan has {state.width - state.plan.n_cached} (run plan.input_ids)")
        layer.kbuf[:, :, start:end].copy_(k)
        layer.vbuf[:, :, start:end].copy_(v)
        if end < state.width:  # chunked prefill: more forwards follow
            layer.fill = end
            layer.keys, layer.values = layer.kbuf[:, :, :end], layer.vbuf[:, :, :end]
            return layer.keys, layer.values
        layer.keys, layer.values = layer.kbuf, layer.vbuf
        layer.fill = None
        layer.kbuf = layer.vbuf = None
        self._save_layer(state, layer.index, layer.keys, layer.values)
        state.done_layers += 1
        if state.done_layers == len(self.layers):
            self._finish(state)
        return layer.keys, layer.values

    def _update_head(self, state: _Prefill, layer: _StoreLayer, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head forward: its columns go first in the layer's buffers; once they are all there the
        layer's length jumps to the plan's cached columns (the loaded ones, placed at the next update)."""
        n = k.shape[-2]
        start = layer.fill or 0
        end = start + n
        if end > layer.head_end:
            raise ValueError(f"layer {layer.index}: the head forward brought {end} tokens; the plan's head has "
                             f"{layer.head_end} (run plan.head_inputs() first, then plan.model_inputs())")
        if layer.kbuf is None:
            self._check_states(state, layer, k, v)
            conn = self.connector
            shape = (k.shape[0], conn.layout.num_kv_heads, state.width, conn.layout.head_size)
            layer.kbuf = torch.empty(shape, dtype=conn.torch_dtype, device=conn.device)
            layer.vbuf = torch.empty_like(layer.kbuf)
            layer.is_initialized = True
            layer.device, layer.dtype = conn.device, conn.torch_dtype
        assert layer.kbuf is not None and layer.vbuf is not None
        layer.kbuf[:, :, start:end].copy_(k)
        layer.vbuf[:, :, start:end].copy_(v)
        keys, values = layer.kbuf[:, :, :end], layer.vbuf[:, :, :end]
        if end == layer.head_end:
            layer.head_end = 0
            layer.fill = state.plan.n_cached
        else:
            layer.fill = end
        layer.keys, layer.values = keys, values
        return keys, values

    def _check_states(self, state: _Prefill, layer: _StoreLayer, k: torch.Tensor, v: torch.Tensor) -> None:
        conn = self.connector
        layout = conn.layout
        batch = state.plan.full_input_ids.shape[0]
        shape = (batch, layout.num_kv_heads, k.shape[-2], layout.head_size)
        if k.shape[-1] != v.shape[-1]:
            raise UnsupportedModelError(f"K and V head sizes differ ({k.shape[-1]} vs {v.shape[-1]}, e.g. MLA); "
                                        "kvtier's transformers cache needs one head size")
        if tuple(k.shape) != shape or k.dtype != conn.torch_dtype or k.device != conn.device:
            raise LayoutMismatchError(f"layer {layer.index}: the model produced K {tuple(k.shape)} {k.dtype} on "
                                      f"{k.device}; the plan expects {shape} {conn.torch_dtype} on {conn.device} "
                                      "(batch expansion such as num_beams or num_return_sequences > 1 is not supported)")

    def _install(self, state: _Prefill, layer: _StoreLayer) -> None:
        """Wait for layer's loads and scatter them into its K/V buffers (raises PrefixLoadError on a failure)."""
        conn = self.connector
        layout = conn.layout
        plan = state.plan
        batch = plan.full_input_ids.shape[0]
        dtype, device = conn.torch_dtype, conn.device
        t0 = time.perf_counter()
        failed: set[int] = set()
        for h in state.layer_handles[layer.index]:
            failed |= self._wait(state, h)
        if failed:
            valid = _valid_chunks(state, failed)
            raise PrefixLoadError(f"layer {layer.index}: {len(failed)} chunks failed to load; prepare again "
                                  f"capped to {valid} chunks per row", valid)
        heads, ct, hd = layout.num_kv_heads, conn.chunk_tokens, layout.head_size
        if layer.kbuf is not None:  # the head forward's columns are in place
            kbuf, vbuf = layer.kbuf, layer.vbuf
            assert vbuf is not None
        else:
            kbuf = torch.empty((batch, heads, state.width, hd), dtype=dtype, device=device)
            vbuf = torch.empty_like(kbuf)
        staged = state.staging[layer.index]
        state.staging[layer.index] = None
        w = plan.n_cached
        if w:
            if state.direct:
                sections = self._direct_sections(state, layer.index)
            else:
                assert staged is not None
                sections = state.copies.copy(layer.index, staged.view(dtype).view(-1, heads, 2, ct, hd))
            if sections is None:  # the host -> device copy failed: recompute every chunk it carried
                carried: set[int] = set().union(*state.row_units)
                self.connector.report_load_failure(len(carried), state.copies.failed(layer.index) or "copy failed")
                valid = _valid_chunks(state, carried)
                raise PrefixLoadError(f"layer {layer.index}: copying the loaded KV to {device} failed; "
                                      f"prepare again capped to {valid} chunks per row", valid)
            state.copies.ready(layer.index)  # the forward's stream waits for this layer's copy only
            for b, units in enumerate(state.row_units):
                lead = w - len(units) * ct
                if lead > state.head:  # padding before the row's loaded columns (not the head's)
                    kbuf[b, :, state.head:lead].zero_()
                    vbuf[b, :, state.head:lead].zero_()
                col = lead
                for first, count in _runs(units):
                    src = sections[first:first + count].transpose(0, 1)  # [heads, count, 2, ct, hd]
                    cols = slice(col, col + count * ct)
                    kbuf[b, :, cols].view(heads, count, ct, hd).copy_(src[:, :, 0])
                    vbuf[b, :, cols].view(heads, count, ct, hd).copy_(src[:, :, 1])
                    col += count * ct
        layer.kbuf, layer.vbuf = kbuf, vbuf
        layer.keys, layer.values = kbuf[:, :, :w], vbuf[:, :, :w]
        layer.is_initialized = True
        layer.installed = True
        layer.device = device
        layer.dtype = dtype
        state.load_wait_s += time.perf_counter() - t0

    def _direct_sections(self, state: _Prefill, layer: int) -> torch.Tensor | None:
        """Layer's sections [units, heads, 2, chunk tokens, head size] inside its group's device copy
        (None when the group's copies failed); the group's buffer is dropped with its last layer."""
        conn = self.connector
        layout = conn.layout
        g0 = state.group_start[layer]
        buf = state.group_bufs.get(g0)
        if buf is None:
            return None
        lb = layout.layer_bytes(conn.chunk_tokens)
        off = (layer - g0) * lb
        out = buf[:, off:off + lb].view(conn.torch_dtype).view(
            buf.shape[0], layout.num_kv_heads, 2, conn.chunk_tokens, layout.head_size)
        if layer + 1 == len(state.group_start) or state.group_start[layer + 1] != g0:
            state.group_bufs[g0] = None
        return out

    def _wait(self, state: _Prefill, handle: Any) -> set[int]:
        key = id(handle)
        done = state.handle_failed.get(key)
        if done is not None:
            return done
        units = state.handle_units[key]
        try:
            result = handle.wait()
            failed = {units[i] for i in result.failed}
            reason = "a chunk failed validation or vanished from its tier"
        except Exception as e:  # noqa: BLE001 - a load error is a miss: recompute, count, log once
            failed = set(units)
            reason = f"{type(e).__name__}: {e}"
        state.handle_failed[key] = failed
        if failed:
            self.connector.report_load_failure(len(failed), reason)
        return failed

    def _save_layer(self, state: _Prefill, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Gather this layer's part of each new chunk (on the KV's device), copy it to the host and write
        it to the store; the last layer commits (publishes). On CUDA the copy runs on the save stream and
        the writes on SaveCopies' worker once it completes, so the forward goes on at once. Direct saves
        copy into the reserved slots themselves and the worker only marks them filled."""
        if not state.saves or state.save_broken:
            return
        conn = self.connector
        copies = conn.save_copies
        t0 = time.perf_counter()
        state.save_lock.acquire()
        try:
            if state.save_broken:  # a copy of an earlier layer failed meanwhile (on the save worker)
                return
            heads, ct, hd = conn.layout.num_kv_heads, conn.chunk_tokens, conn.layout.head_size
            lb = conn.layout.layer_bytes(ct)
            chunks = sum(len(s.keys) for s in state.saves)
            if state.batches is None:
                state.batches = []
                for s in state.saves:
                    started = conn.store.begin_save(s.keys, s.parent, s.depth)
                    state.batches.append(started)
                    if hasattr(started, "checksum_threads"):  # an in-process store's SaveBatch
                        started.checksum_threads = keys.is_cuda  # on the CPU: not beside the forward's threads
                state.save_offsets = _direct_offsets(state.batches) if conn.direct_saves else None
                if state.save_offsets is None and keys.is_cuda:
                    state.save_buf = conn.save_pool.acquire(chunks * lb * len(self.layers))
            first = layer * chunks
            for i, (s, batch) in enumerate(zip(state.saves, state.batches)):
                n = len(s.keys)
                cols = slice(s.column, s.column + n * ct)
                if state.save_offsets is not None:  # into the group's buffer, copied to the slots once complete
                    g0, group = self._save_group(state, i, layer, (n, heads, 2, ct, hd), keys)
                    sec = group[0][:, layer - g0]
                else:
                    sec = torch.empty((n, heads, 2, ct, hd), dtype=keys.dtype, device=keys.device)
                sec[:, :, 0] = keys[s.row, :, cols].view(heads, n, ct, hd).transpose(0, 1)
                sec[:, :, 1] = values[s.row, :, cols].view(heads, n, ct, hd).transpose(0, 1)
                if state.save_offsets is not None:
                    group[1] += 1
                    span = group[0].shape[1]
                    if group[1] == span:  # every layer of the group gathered: one copy per run of slots
                        del state.save_groups[(i, g0)]
                        pool = conn.pool_tensor()
                        starts = [(row, off + g0 * lb) for row, off in enumerate(state.save_offsets[i])]
                        pieces = [(row, pool[off:off + k * span * lb]) for row, off, k in pool_runs(starts, span * lb)]
                        state.save_event = ready = copies.to_pool(group[0].view(n, -1).view(torch.uint8), pieces)
                        copies.then(ready, _filler(state, batch, g0, span), self._save_error(state))
                    continue
                out = state.save_buf[first * lb:(first + n) * lb] if state.save_buf is not None else None
                first += n
                host, ready = copies.to_host(sec, out)
                copies.then(ready, _writer(state, batch, layer, host, n), self._save_error(state))
            state.saved_layers += 1
            if state.saved_layers == len(self.layers):
                copies.then(_DONE, self._committer(state), self._save_error(state))
        except Exception as e:  # noqa: BLE001 - a save never fails generation; counted and logged once
            self._save_error(state)(e)
        finally:
            state.save_lock.release()
            spent = time.perf_counter() - t0
            state.save_s += spent
            conn.add_save_seconds(spent)

    def _save_group(self, state: _Prefill, batch: int, layer: int, section: tuple[int, ...],
                    like: torch.Tensor) -> tuple[int, list[Any]]:
        """Direct saves: (first layer, [device buffer [chunks, layers, *section], layers gathered so far])
        of the group of layers (connector.save_group_layers) that `layer` belongs to, for one batch."""
        size = self.connector.save_group_layers
        g0 = layer - layer % size
        group = state.save_groups.get((batch, g0))
        if group is None:
            span = min(size, len(self.layers) - g0)
            buf = torch.empty((section[0], span, *section[1:]), dtype=like.dtype, device=like.device)
            group = state.save_groups[(batch, g0)] = [buf, 0]
        return g0, group

    def _committer(self, state: _Prefill) -> Callable[[], None]:
        conn = self.connector

        def commit() -> None:
            if not state.save_broken:
                for s, batch in zip(state.saves, state.batches or []):
                    conn.watch_save(batch.commit(), len(s.keys))
            self._release_save_buf(self.connector, state)

        return commit

    def _save_error(self, state: _Prefill) -> Callable[[BaseException], None]:
        conn = self.connector

        def failed(e: BaseException) -> None:
            with state.save_lock:
                if state.save_broken:
                    return
                state.save_broken = True
                self._abort_saves(state)
            self._release_save_buf(self.connector, state)
            conn.report_save_failure(sum(len(s.keys) for s in state.saves), f"{type(e).__name__}: {e}")

        return failed

    @staticmethod
    def _release_save_buf(conn: TransformersConnector, state: _Prefill) -> None:
        buf, state.save_buf = state.save_buf, None
        if buf is not None:
            conn.save_pool.release(buf)

    @staticmethod
    def _release_staging(conn: TransformersConnector, state: _Prefill) -> None:
        buf, state.staging_buf = state.staging_buf, None
        if buf is not None:
            conn.staging_pool.release(buf, state.copies.last_event if state.copies else None)

    def _finish(self, state: _Prefill) -> None:
        self._forget_prefill()
        self._release_staging(self.connector, state)
        self._release_borrowed(self.connector, state)
        self.load_wait_s = state.load_wait_s
        self.forward_wait_s = state.load_wait_s - state.prepare_wait_s
        self.forward_save_s = state.save_s
        self.connector.record_prefill(state.plan, state.load_wait_s)
        for tier, handles in state.tier_handles.items():
            if any(state.handle_failed.get(id(h)) for h in handles):
                continue  # a failed load says nothing about the tier's speed
            ends = [state.done_at.get(id(h)) for h in handles]
            if handles and all(e is not None for e in ends):
                seconds = max(e for e in ends if e is not None) - state.load_started
                self.connector.observe_load(tier, state.tier_bytes[tier], seconds)
        self._state = None

    # -- lifecycle -----------------------------------------------------------------------------
    def discard(self) -> None:
        """Drop this cache's contents and any prefill in flight (waits for its loads, aborts its save)."""
        state = self._state
        self._state = None
        self._forget_prefill()
        if state is not None:
            self._drop_prefill(self.connector, state)
        for layer in self._store_layers:
            layer.clear()

    def _track_prefill(self, state: _Prefill) -> None:
        """A prefill in flight holds store resources (borrowed chunks, DRAM reservations, pooled
        buffers): a cache dropped before its prefill ends (no discard(), an exception in the forward)
        gives them back when it is collected, instead of pinning them for the process's life."""
        self._forget_prefill()
        self._janitor = weakref.finalize(self, KVTierCache._drop_later, self.connector, state)

    def _forget_prefill(self) -> None:
        janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.detach()

    @staticmethod
    def _drop_later(conn: TransformersConnector, state: _Prefill) -> None:
        """The finalizer: the garbage collector may run it on any thread, an I/O thread of the store
        included, where waiting for the prefill's loads would wait for itself; so it waits nowhere and
        hands the work to a thread of its own."""
        threading.Thread(target=KVTierCache._drop_prefill, args=(conn, state), name="kvtier-drop-prefill",
                         daemon=True).start()

    @staticmethod
    def _drop_prefill(conn: TransformersConnector, state: _Prefill) -> None:
        """Wait for a prefill's loads, abort its saves and hand back what it holds."""
        for h in state.all_handles:
            try:
                h.wait()
            except Exception:  # noqa: BLE001 - reported by _wait when it mattered; now unused
                pass
        conn.save_copies.drain()  # no write of this prefill runs after the abort
        state.save_broken = True
        KVTierCache._abort_saves(state)
        KVTierCache._release_save_buf(conn, state)
        KVTierCache._release_staging(conn, state)
        KVTierCache._release_borrowed(conn, state)

    @staticmethod
    def _abort_saves(state: _Prefill) -> None:
        """Release the DRAM reservations of saves not committed (a committed batch ignores abort), once
        no direct save's copy still writes into their slots."""
        event, state.save_event = state.save_event, None
        if event is not None:
            try:
                event.synchronize()
            except Exception:  # noqa: BLE001 - a CUDA error: the save stream runs nothing more
                pass
        if state.batches:
            for batch in state.batches:
                try:
                    batch.abort()
                except Exception:  # noqa: BLE001 - best effort release of DRAM reservations
                    pass


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, tokens]")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    ids = input_ids.detach().to("cpu")
    if attention_mask is None:
        return ids, None
    if tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(ids.shape)}")
    mask = attention_mask.detach().to("cpu").bool()
    if mask.all():
        return ids, None
    if ids.shape[1] and bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError("attention_mask must be left padding (zeros before the prompt), as generate() expects")
    return ids, mask


_DONE = DoneEvent()


def _writer(state: _Prefill, batch: Any, layer: int, host: torch.Tensor, n: int) -> Callable[[], None]:
    def write() -> None:
        if state.save_broken:
            return
        raw = host.reshape(n, -1).view(torch.uint8).numpy()
        batch.write_layer(layer, [raw[i] for i in range(n)])

    return write


def _filler(state: _Prefill, batch: Any, first: int, span: int) -> Callable[[], None]:
    """Direct saves: once the copies of layers first .. first + span - 1 into the slots completed, they
    count as written (and their checksums start on the store's verify threads)."""
    def fill() -> None:
        if not state.save_broken:
            batch.mark_filled(first, span)

    return fill


def _direct_offsets(batches: Sequence[Any]) -> list[list[int]] | None:
    """Each batch's slot offsets in the store's pool, or None when a chunk has no slot (DRAM full: its
    layers go aside through write_layer, so the whole save is staged)."""
    out = []
    for batch in batches:
        offsets = batch.slot_offsets()
        if any(off is None for off in offsets):
            return None
        out.append([int(off) for off in offsets])
    return out


def _stamp_done(state: _Prefill, handle: Any) -> None:
    add = getattr(handle, "add_done_callback", None)
    if add is not None:
        add(lambda h: state.done_at.__setitem__(id(h), time.perf_counter()))


def _make_plan(ids: torch.Tensor, lengths: list[int], cached: list[int], pad_id: int,
               device: torch.device | str = "cpu", skipped: list[int] | None = None,
               head: list[int] | None = None) -> PrefillPlan:
    """The plan's tensors are built on the CPU (from the token lists) and handed over on `device`,
    the model's: a model on a GPU must not be given CPU input ids, masks or positions. `cached`
    counts each row's columns before the forward, `head` the leading ones among them that the
    head forward computes (one row only)."""
    head = head or [0] * len(lengths)
    if any(head) and len(lengths) != 1:
        raise ValueError("a head forward is planned for one row only")
    batch, total = ids.shape
    w = max(cached, default=0)
    suffix = [n - h for n, h in zip(lengths, cached)]
    q = max(suffix, default=0)
    width = w + q
    full = torch.full((batch, width), pad_id, dtype=ids.dtype)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b in range(batch):
        row = ids[b, total - lengths[b]:]
        h, s = cached[b], suffix[b]
        full[b, w - h:w] = row[:h]
        full[b, width - s:] = row[h:]
        mask[b, w - h:w] = 1
        mask[b, width - s:] = 1
    padded = not bool(mask.all())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, w:] if padded else None
    full = full.to(device)
    return PrefillPlan(full[:, w:], mask.to(device) if padded else None,
                       positions.to(device) if positions is not None else None, full, tuple(lengths),
                       tuple(c - h for c, h in zip(cached, head)), w, tuple(skipped or [0] * batch),
                       full[:, :head[0]] if head[0] else None, tuple(head))


def _valid_chunks(state: _Prefill, failed: set[int]) -> tuple[int, ...]:
    """Per row, the stored chunks still usable: its head's, then its loaded ones up to the first failed."""
    out = []
    for b, units in enumerate(state.row_units):
        n = 0
        while n < len(units) and units[n] not in failed:
            n += 1
        out.append((state.row_first[b] if state.row_first else 0) + n)
    return tuple(out)


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of unique-chunk indices as (first, count)."""
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and runs[-1][0] + runs[-1][1] == u:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((u, 1))
    return runs
