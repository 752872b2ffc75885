"""SparseKV: the full KV of one long request in a TieredStore, attended through a budgeted working set.

Who calls: the transformers connector (one SparseKV per sequence of a batch, from the
cache's `update` and the registered attention function) and the sparse benchmark (synthetic
KV written straight in). Single-threaded: one forward pass at a time.

    append(layer, k, v)                 new tokens of one layer ([H, n, d]); whole blocks are
                                        summarized and saved (layer by layer; the chunk is
                                        committed, with its summaries, after the last layer)
    attend(layer, q, scaling, mask)     sparse attention of q [Hq, nq, d]: sinks + window +
                                        tail + the policy's blocks, fetching only what changed
    attend_dense(layer, q, scaling, mask)  exact attention over every stored block, streamed
                                        through a staging buffer of `slots` blocks (chunked
                                        prefill after the first chunk)
    flush(), close()                    wait for every save; BlocksNotStoredError names the blocks
                                        the store refused or failed to store (and why), and is
                                        raised again by every later append and store read
    discard()                           drop the request (a cache reset for the next prompt, a cache
                                        collected): release everything it holds, raise nothing of
                                        its saves (logged once, at warning level)
    fast_tier_bytes(), budget_bytes()

Blocks are chunks of the store (block_tokens == the store's chunk_tokens), keyed by a chain
private to this instance (a random nonce, after the caller's salt if any): the KV of a generated
continuation is not a prompt prefix anyone else can reuse, and keys that name no content must
never be shared (a second instance would read the first one's blocks).

Store layout (`sparse_store_layout`): a chunk's sections are not one per model layer but one
per (layer, KV head, plane), each [block_tokens, head_size] with its own checksum. GQA heads
select blocks on their own, so a decode step reads only the (block, head) slices some head
newly wants, each verified as it is read, straight into that head's working-set slot. With
one section per layer a block one head wanted cost every head's bytes: on random KV at 64k
tokens the union over 8 heads' picks read ~5x the bytes the heads needed. The cost of the
finer sections: the disk tier aligns each section to 4 KiB (no waste at realistic shapes,
e.g. 64 tokens x 128 dims x 2 bytes = 16 KiB; tiny test models pad) and the header lists
layers x heads x 2 sections.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kvtier.core.codec import SECTION_SUMMARY
from kvtier.core.errors import StoreClosedError
from kvtier.core.keys import chunk_key, get_hash_mode, tokens_to_bytes
from kvtier.core.layout import KVLayout
from kvtier.sparse.config import SparseConfig
from kvtier.sparse.errors import (
    BlockMissingError,
    BlocksNotStoredError,
    SparseConfigError,
    WorkingSetMemoryError,
)
from kvtier.sparse.policies import make_policy, scores, sticky_topk
from kvtier.sparse.prefetch import Prefetcher
from kvtier.sparse.staging import HostStaging
from kvtier.sparse.summary import BlockSummaries, Summarizer, SummaryTable
from kvtier.sparse.working_set import EMPTY, WorkingSet, host_indices_to
from kvtier.sparse.writer import BackgroundWriter
from kvtier.store.tiered import SaveBatch, SaveResult, TieredStore
from kvtier.store.transfer import TransferHandle

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SpanSave:
    """A span's save in flight: keys and parent fixed by layer 0's append, the SaveBatch and the
    summary sections filled by the writer's jobs, layer by layer; after the commit, the store's
    handle of its lower-tier writes and whether every block got a DRAM slot (`resident`)."""

    keys: Sequence[bytes]
    parent: bytes
    first: int
    m: int
    extras: list[list[tuple[int, int, bytes]]]
    batch: SaveBatch | None = None
    handle: TransferHandle[SaveResult] | None = None
    resident: bool = True


def _listed(blocks: list[int]) -> str:
    """Blocks for a message: the first eight."""
    return f"{blocks[:8]}" if len(blocks) <= 8 else f"{blocks[:8]} ..."


def _not_stored(unstored: Sequence[tuple[int, str]]) -> str:
    """What `unstored` ((blocks, why) of each save the store did not carry out) says, in one sentence."""
    n = sum(count for count, _ in unstored)
    more = len(unstored) - 3
    return (f"{n} block{'s' if n != 1 else ''} of this request {'were' if n != 1 else 'was'} not stored: "
            + "; ".join(why for _, why in unstored[:3]) + (f"; and {more} more saves" if more > 0 else ""))


def _unstored_why(store: TieredStore, save: _SpanSave) -> tuple[int, str] | None:
    """(blocks, why) if the store did not store blocks of the committed `save` where it was to (waits
    for its writes), else None. Its handle raises on a tier's I/O failure; a refusal (disk full, no
    room without cutting a chain) is only in SaveResult.errors; and a block DRAM had no slot for, in
    a store with nothing below DRAM, is dropped without a word (fewer chunks in memory and on disk
    than saved). Only then are the blocks looked up: what they find decides (a disk failure whose
    blocks the lower tiers took left nothing unstored); the store's words say why.

    A function of the store and the save alone, so that a dropped request's last saves can be
    checked on a thread of their own without keeping the request (its working sets) alive."""
    assert save.handle is not None
    try:
        result = save.handle.wait()
    except Exception as e:  # noqa: BLE001 - the store's report of a failed write: recorded, raised by flush
        reasons = [f"{e}"]
    else:
        if not result.errors and result.chunks in (result.in_memory, result.on_disk):
            return None
        reasons = list(result.errors)
    lost, dram_only = _unstored_blocks(store, save)
    if not lost and not dram_only:
        return None
    span = f"blocks {save.first}..{save.first + save.m - 1}"
    parts = []
    if lost:
        parts.append(f"{len(lost)} in no tier of the store {_listed(lost)}")
    if dram_only:
        parts.append(f"{len(dram_only)} only in DRAM, not written below it (DRAM drops them when it evicts) "
                     f"{_listed(dram_only)}")
    said = (f"; the store said (chunk i = block {save.first} + i): {'; '.join(reasons[:3])}" if reasons
            else "; DRAM had no slot for them and no tier below it took them")
    return len(lost) + len(dram_only), f"{span}: {', '.join(parts)}{said}"


def _unstored_blocks(store: TieredStore, save: _SpanSave) -> tuple[list[int], list[int]]:
    """Blocks of `save` in no tier, and blocks only DRAM holds where the store writes through to
    tiers below it (the disk in write-through mode, the lower tiers always), once the lower-tier
    writes queued for them ended (a bounded wait; a lower tier's own timeouts end its writes)."""
    blocks = range(save.first, save.first + save.m)
    try:
        if store.lower_tiers:  # a disk failure's blocks may still be on their way to the lower tiers
            store.wait_lower(save.keys, _LOWER_WAIT_S)
        through = store.config.write_mode == "write-through"
        below = [t for t in (store.disk,) if t is not None and through] + list(store.lower_tiers)
        lost: list[int] = []
        dram_only: list[int] = []
        for block, key in zip(blocks, save.keys):
            if not store.lookup([key], touch=False).hits:
                lost.append(block)
            elif below and not any(tier.contains(key) for tier in below):
                dram_only.append(block)
    except StoreClosedError:  # nothing to look in: every block of the failed save counts
        return list(blocks), []
    return lost, dram_only


def _report_dropped_saves(store: TieredStore, saves: list[_SpanSave], request: str) -> None:
    """Check the saves a discarded request left in flight once their writes end, and log (never
    raise: nobody is left to raise to) the blocks they did not store. Runs on a thread of its own."""
    try:
        found = [why for save in saves if (why := _unstored_why(store, save)) is not None]
    except Exception:  # noqa: BLE001 - a thread of its own: logged, never lost
        log.warning("sparse %s (discarded): checking its last saves failed", request, exc_info=True)
        return
    if found:
        log.warning("sparse %s (discarded, so not raised): %s", request, _not_stored(found))


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """Masked attention of every KV head at once, q [H, G, d], k, v [H, L, d], mask [H, G or 1, L]
    (True = keep): torch's fused sdpa on an accelerator, `masked_attention` on the CPU (faster
    there for a few query rows, and what the CPU results were measured with)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return masked_attention(q, k, v, mask, scaling)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, masked) v for q [H, G, d], k, v [H, L, d], mask [H, G or 1, L] (True = keep).

    Plain matmuls: for a few query rows on CPU they beat sdpa's flash kernel several times over.
    The scores are the selection policies' `scores`, (k q^T)^T: for G <= 4 rows MKL runs k @ q^T
    as a matrix-vector product at memory speed, where q @ k^T takes a path ~4x slower (measured
    at 4k and 64k keys, one thread); for more rows both are the same GEMM."""
    s = scores(q * scaling, k)
    if mask is not None:
        s = torch.where(mask, s, float("-inf"))  # one op; masked_fill(~mask) is two and ~2x slower here
    return torch.softmax(s, dim=-1) @ v


# the prefill writer's queue holds at most this much of the new KV (on the GPU until each job's copy)
WRITER_MAX_BYTES = 1 << 30
# streamed chunked-prefill attention scores at most this many bytes of float32 scores at once
_STREAM_SCORE_BYTES = 256 << 20
# a failed save's check waits at most this long for its blocks' lower-tier writes still queued
_LOWER_WAIT_S = 60.0

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sparse_store_layout(layout: KVLayout) -> KVLayout:
    """The layout of the TieredStore that holds a model's KV (`layout`) for SparseKV: one section
    per (layer, KV head, plane), section index (layer * kv_heads + head) * planes + plane."""
    return KVLayout(layout.num_layers * layout.num_kv_heads * layout.planes, 1, layout.head_size,
                    layout.dtype, planes=1)


class SparseKV:
    """One request's KV: `layout` is the model's KV layout; the store's must be sparse_store_layout(layout).

    `device` is where the model's tensors are: the summaries, selection, working sets and attention
    run there; the full KV stays in the store (host DRAM, then disk). `stage_fetches` routes decode's
    store reads through a host staging buffer and one batched copy per layer even on the CPU
    (always on for an accelerator; on the CPU reads land in the slots directly unless asked).
    `async_writes` saves completed blocks and their summaries on a background writer (sparse.writer)
    while the forward goes on; a store read waits for what is queued, `flush`/`close` for all of it."""

    def __init__(self, store: TieredStore, config: SparseConfig, layout: KVLayout, *,
                 salt: bytes | None = None, device: torch.device | str | None = None,
                 stage_fetches: bool | None = None, async_writes: bool = True) -> None:
        if store.chunk_tokens != config.block_tokens:
            raise SparseConfigError(
                f"sparse.block_tokens {config.block_tokens} must equal the store's chunk_tokens {store.chunk_tokens}"
            )
        if layout.planes != 2 or layout.dtype not in TORCH_DTYPES:
            raise SparseConfigError(f"sparse attention needs K and V planes of {sorted(TORCH_DTYPES)}, got {layout}")
        if store.layout != sparse_store_layout(layout):
            raise SparseConfigError(
                f"the store's layout {store.layout} does not hold {layout} per KV head: open the store "
                f"with kvtier.sparse.sparse_store_layout(layout) = {sparse_store_layout(layout)}"
            )
        self.store = store
        self.config = config
        self.layout = layout
        self.dtype = TORCH_DTYPES[layout.dtype]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        h, d, n_layers = layout.num_kv_heads, layout.head_size, layout.num_layers
        self.summarizer = Summarizer(h, d, config.hash_bits, config.summary_seed, device=self.device)
        self.policy = make_policy(config.policy, self.summarizer.projection)
        # Quest's bounds (and the mean) in the KV's dtype when it is 16-bit: half the table, still true bounds
        bounds = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.float32
        self.tables = [SummaryTable(h, d, config.hash_bits, self.policy.summary_fields, config.block_tokens,
                                    device=self.device, bounds_dtype=bounds) for _ in range(n_layers)]
        slots = config.slots
        try:
            self.working = [WorkingSet(h, slots, config.block_tokens, d, self.dtype, self.device)
                            for _ in range(n_layers)]
        except WorkingSetMemoryError as e:
            raise WorkingSetMemoryError(
                f"sparse.budget_tokens {config.budget_tokens} needs {self.budget_bytes()} bytes of working sets "
                f"on {self.device} ({n_layers} layers x {h} KV heads x {slots + 1} slots of {config.block_tokens} "
                f"tokens, K and V) and the device ran out of memory: lower the budget. ({e})") from e
        self.stage_fetches = self.device.type != "cpu" if stage_fetches is None else stage_fetches
        self.num_tokens = [0] * n_layers
        self.block_keys: list[bytes] = []
        mode = get_hash_mode(store.config.hash_mode)
        self._hash = mode
        # a random nonce always: the blocks' keys name no content, so two instances given one salt
        # (a cache reset for the next prompt, two rows, two requests) must never name each other's
        # blocks (the store keeps a key's first copy: the second would read the first's KV)
        self._root = mode.digest(b"kvtier-sparse-request\0" + (salt or b"") + b"\0" + os.urandom(16))
        self._open: _SpanSave | None = None  # the span whose layers are being appended
        # prefill's writes run beside the forward (bounded: two spans of jobs); None = synchronous
        self._writer = BackgroundWriter(max_pending=2 * n_layers, max_bytes=WRITER_MAX_BYTES) if async_writes else None
        # committed spans whose store writes are not checked yet, oldest first (the writer appends,
        # the forward's thread pops: a deque, safe for one of each)
        self._saves: deque[_SpanSave] = deque()
        self._unstored: list[tuple[int, str]] = []  # (blocks, why) of each save the store did not carry out
        self._reported = 0  # how many of _unstored a caller was told of (raised); discard logs the rest
        # spans whose save may hold a SaveBatch not committed (its DRAM reservations): the open one and
        # those whose jobs still wait in the writer; pruned as spans commit, aborted by discard
        self._uncommitted: list[_SpanSave] = []
        self._closed = False  # close() ran
        self._discarded = False  # discard() ran: nothing more may be appended or attended
        # blocks of the span being saved (committed after the last layer): layer -> (first, K, V [H, mB, d])
        self._span: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._steps = [0] * n_layers
        self._picks: list[torch.Tensor | None] = [None] * n_layers
        # decode prefetch (sparse.prefetch_blocks): the runners-up of each layer's last selection
        self._prefetch = Prefetcher(self.device, self._store_gather, store.layer_bytes) if config.prefetch_blocks else None
        self._runners: torch.Tensor | None = None  # set by _select, passed to ensure by attend
        self.fetched_bytes = 0  # KV bytes read from the store (decode's slices and streamed blocks)
        self.fetch_seconds = 0.0  # wall time of decode's store reads (`_fill`), for the bench's breakdown
        self._section_bytes = store.layer_bytes  # one head's K (or V) of one block
        # fetch staging (grow-only, reused): _fetch's K and V are views of it, valid until the next fetch
        self._staging = torch.empty(0, h, 2, self._section_bytes, dtype=torch.uint8)
        # decode's fill staging: row i = (K, V) of one (block, head) slice, then one copy to the device
        self._fill_staging = HostStaging((2, self._section_bytes), self.device)
        # chunked prefill: layer -> (blocks, K, V [H, blocks * B, d]) gathered on the device by the last
        # attend_dense, so the next chunk reads only the blocks completed since (dropped at decode)
        self._gathered: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._gather_buf: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # what _gathered's views are of
        self._gather_parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prefill blocks not yet in it

    # -- writing -------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens k, v [H, n, d] to `layer` (layers in order 0..L-1 for each new span).

        Raises BlocksNotStoredError once a save of this request is known to have left blocks
        unstored (checked at each layer 0 without waiting): the prefill stops at the next chunk,
        not at decode."""
        if self._discarded:
            raise RuntimeError("append to a discarded SparseKV")
        if layer == 0:
            self._settle_saves(wait=False)
        self._raise_unstored()
        ws = self.working[layer]
        bt = self.config.block_tokens
        n = k.shape[1]
        first_block = self.num_tokens[layer] // bt
        full_k: list[torch.Tensor] = []
        full_v: list[torch.Tensor] = []
        pos = 0
        if ws.tail_len:
            take = min(bt - ws.tail_len, n)
            ws.append_tail(k[:, :take], v[:, :take])
            pos = take
            if ws.tail_len == bt:
                tk, tv = ws.tail()
                full_k.append(tk.clone())
                full_v.append(tv.clone())
                ws.reset_tail()
        whole = (n - pos) // bt * bt
        if whole:
            full_k.append(k[:, pos : pos + whole])
            full_v.append(v[:, pos : pos + whole])
            pos += whole
        if pos < n:
            ws.append_tail(k[:, pos:], v[:, pos:])
        self.num_tokens[layer] += n
        if full_k:
            kk = torch.cat(full_k, 1).to(self.dtype) if len(full_k) > 1 else full_k[0].to(self.dtype)
            vv = torch.cat(full_v, 1).to(self.dtype) if len(full_v) > 1 else full_v[0].to(self.dtype)
            self._complete(layer, first_block, kk, vv)

    def _complete(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cfg = self.config
        bt = cfg.block_tokens
        m = k.shape[1] // bt
        summaries = self.summarizer.compute(k, bt)
        self.tables[layer].append(summaries)
        self._save_layer(layer, first, m, k, v, summaries)
        self._extend_gathered(layer, first, k, v)
        ws = self.working[layer]
        nb = first + m
        if self.policy.dense:
            ws.grow(nb)
        win_lo = nb - cfg.window_blocks
        sinks = cfg.sink_blocks

        def protected(block_of: torch.Tensor) -> torch.Tensor:
            return (block_of != EMPTY) & ((block_of < sinks) | (block_of >= win_lo))

        hk = k.unflatten(1, (m, bt))
        hv = v.unflatten(1, (m, bt))
        for i in range(m):
            block = first + i
            if self.policy.dense or block < sinks or block >= win_lo:
                ws.insert(block, hk[:, i], hv[:, i], protected)

    def _extend_gathered(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """While a prefill appends the context from its start: keep its completed blocks gathered on
        the device (as `_attend_gathered` would gather them) while the context fits one gathered
        piece, so the next chunk's attend_dense reads nothing back from the store and never waits for
        the background writer (on the H200 that read-back and wait made a 32k prefill 5.45x dense).
        A context past the piece, a released prefill (decode), or a gap leaves the gathered as it is."""
        bt = self.config.block_tokens
        have = self._gathered.get(layer)
        parts = self._gather_parts.get(layer, [])
        n = (have[0] if have is not None else 0) + sum(pk.shape[1] for pk, _ in parts) // bt
        m = k.shape[1] // bt
        if n != first or first + m > self._gather_blocks(layer):
            return
        self._gather_parts[layer] = [*parts, (k, v)]  # referenced, not copied: gathered by the next attend_dense, if any comes

    def _gather_pending(self, layer: int) -> None:
        """Copy the blocks `_extend_gathered` kept for `layer` into its gathered context."""
        parts = self._gather_parts.pop(layer, [])
        dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        for k, v in parts:
            self._gather_append(layer, k.to(dtype), v.to(dtype))

    def _gather_append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append whole blocks k, v [H, n, d] (in the gathered dtype, on the device) to `layer`'s gathered
        context. They are written into a buffer grown by doubling (up to `_gather_blocks`), so a prefill
        of c chunks copies its context a few times, not c times (a torch.cat per chunk did)."""
        have = self._gathered.get(layer)
        n0 = have[0] * self.config.block_tokens if have is not None else 0
        need = n0 + k.shape[1]
        buf = self._gather_buf.get(layer)
        if buf is None or buf[0].shape[1] < need or buf[0].dtype != k.dtype or buf[0].device != k.device:
            limit = self._gather_blocks(layer) * self.config.block_tokens
            cap = max(need, min(limit, 2 * (buf[0].shape[1] if buf is not None else 0)))
            h, _, d = k.shape
            grown = (torch.empty(h, cap, d, dtype=k.dtype, device=k.device),
                     torch.empty(h, cap, d, dtype=k.dtype, device=k.device))
            if have is not None:
                grown[0][:, :n0] = have[1]
                grown[1][:, :n0] = have[2]
            buf = self._gather_buf[layer] = grown
        buf[0][:, n0:need] = k
        buf[1][:, n0:need] = v
        self._gathered[layer] = (need // self.config.block_tokens, buf[0][:, :need], buf[1][:, :need])

    def _gather_blocks(self, layer: int) -> int:
        """Most blocks attend_dense attends gathered at once (past it, it streams pieces)."""
        return max(self.working[layer].slots, self.config.dense_stream_tokens // self.config.block_tokens, 1)

    def _save_layer(self, layer: int, first: int, m: int, k: torch.Tensor, v: torch.Tensor,
                    summaries: BlockSummaries) -> None:
        """Queue layer `layer`'s part of the span's save (the background writer, or here when writes
        are synchronous); the span's checks and keys are made here, in the forward's thread."""
        n_layers = self.layout.num_layers
        if layer == 0:
            if self._open is not None:
                raise RuntimeError("a new span started before every layer of the previous one was appended")
            parent = self.block_keys[-1] if self.block_keys else self._root
            keys = []
            prev = parent
            for b in range(first, first + m):
                prev = chunk_key(self._hash, prev, tokens_to_bytes([b]))
                keys.append(prev)
            self.block_keys.extend(keys)
            self._open = _SpanSave(keys, parent, first, m, [[] for _ in range(m)])
            # committed spans (their handle set by the writer's last job) hold no batch
            self._uncommitted = [s for s in self._uncommitted if s.handle is None]
            self._uncommitted.append(self._open)
        elif self._open is None or (self._open.first, self._open.m) != (first, m):
            raise RuntimeError(f"layer {layer} completed blocks {first}..{first + m - 1}, which do not match "
                               f"layer 0's; append every layer the same tokens, in layer order")
        span = self._open
        self._span[layer] = (first, k, v)
        last = layer == n_layers - 1
        if last:
            self._open = None
            self._span.clear()
        if self._writer is None:
            try:
                self._write_layer(span, layer, k, v, summaries, last)
            except BaseException as e:  # raised here; flush and close raise it too (as the writer's are)
                self._unstored.append((span.m, f"blocks {span.first}..{span.first + span.m - 1}: their save "
                                               f"failed: {e!r}"))
                self._reported = len(self._unstored)  # raised now
                raise
        else:
            self._writer.submit(lambda: self._write_layer(span, layer, k, v, summaries, last),
                                k.numel() * k.element_size() + v.numel() * v.element_size())

    def _write_layer(self, span: _SpanSave, layer: int, k: torch.Tensor, v: torch.Tensor,
                     summaries: BlockSummaries, last: bool) -> None:
        """Write one layer of a span into its SaveBatch (begun by layer 0's job); commit after the last."""
        try:
            if span.batch is None:
                span.batch = self.store.begin_save(span.keys, span.parent, span.first)
            h = self.layout.num_kv_heads
            # block-major on the device ([m, H, plane, B*d]: a layer's (head, plane) sections are consecutive
            # in a chunk), one device -> host copy, then one batched write of the m blocks' 2H sections each
            rows = torch.stack((k.unflatten(1, (span.m, -1)).transpose(0, 1),
                                v.unflatten(1, (span.m, -1)).transpose(0, 1)), 2)  # one copy, already block-major
            if rows.is_cuda:  # into page-locked memory: a pageable device->host copy runs at a fraction of the bus
                pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                pinned.copy_(rows)
                rows = pinned
            host = rows.view(torch.uint8).cpu().numpy().reshape(span.m, -1)
            span.batch.write_rows(self._section(layer, 0, 0), 2 * h, host)
            for i, data in enumerate(self.summarizer.encode_all(summaries)):
                span.extras[i].append((SECTION_SUMMARY, layer, data))
            if last:
                # blocks DRAM had no slot for are readable once their disk write lands (_await_writes)
                span.resident = all(o is not None for o in span.batch.slot_offsets())
                span.handle = span.batch.commit([tuple(e) for e in span.extras])
                span.batch, span.extras = None, []  # the store has them now (a batch keeps DRAM-less blocks' bytes)
                self._saves.append(span)
        except BaseException:
            if span.batch is not None:
                span.batch.abort()
            raise

    def _await_writes(self) -> None:
        """Before a store read: let the background writer land every queued block (a read right after
        prefill finds what it wrote); raises SparseWriteError if a write failed. Blocks that got no
        DRAM slot (no DRAM tier, or DRAM full of chunks pinned for their disk writes) are readable
        only once the store's disk write lands: those saves are waited for too, and one that left
        blocks unstored raises BlocksNotStoredError here, naming why, rather than the read's
        BlockMissingError."""
        if self._writer is not None:
            self._writer.drain()  # returns at once when nothing is queued (and no write failed)
        for save in list(self._saves):  # the writer is idle: nothing is appended meanwhile
            if not save.resident:
                assert save.handle is not None
                try:
                    save.handle.wait()
                except Exception:  # noqa: BLE001 - checked (and raised) by _settle_saves below
                    pass
        self._settle_saves(wait=False)
        self._raise_unstored()

    def _settle_saves(self, wait: bool) -> None:
        """Check the committed saves whose store writes ended (every one, waiting, when `wait`), oldest
        first; a save that left blocks unstored is recorded, for `_raise_unstored`. The store writes a
        request's saves in order (one FIFO writer per tier), so the ended ones lead the queue."""
        while self._saves:
            save = self._saves[0]
            assert save.handle is not None
            if not wait and not save.handle.done():
                return
            self._saves.popleft()
            self._check_save(save)

    def _check_save(self, save: _SpanSave) -> None:
        """Record the blocks of the committed `save` the store did not store where it was to
        (`_unstored_why`), for `_raise_unstored`."""
        why = _unstored_why(self.store, save)
        if why is not None:
            self._unstored.append(why)

    def _raise_unstored(self) -> None:
        """Raise BlocksNotStoredError if a save of this request left blocks unstored (every time)."""
        if not self._unstored:
            return
        self._reported = len(self._unstored)
        raise BlocksNotStoredError(
            _not_stored(self._unstored)
            + ". Decode needs every block of the context: this request cannot go on (a full tier: give the store "
            "room for the whole request, or shorten it)"
        )

    def flush(self) -> None:
        """Wait for every queued write and every save's lower-tier writes; raises SparseWriteError for
        a failed background write, BlocksNotStoredError (naming how many blocks and why) if the store
        refused or failed to store blocks of this request. Both are kept: every later flush, close,
        append and store read raises them again (the blocks stay unstored). Nothing, after discard."""
        if self._discarded:
            return
        try:
            if self._writer is not None:
                self._writer.drain()
        finally:
            self._settle_saves(wait=True)  # every save, even after a failed one
        self._raise_unstored()

    def close(self) -> None:
        """`flush`, then stop the background writer (nothing queued is lost) and the prefetcher, and
        give back the DRAM slots of a span whose layers were not all appended (a forward that failed
        part-way); each is stopped whatever the others raise, and the first error is raised after.
        Nothing, after discard."""
        if self._discarded:
            return
        self._closed = True
        errors: list[BaseException] = []
        for step in (self.flush, self._writer.close if self._writer is not None else None,
                     self._abort_uncommitted, self._prefetch.close if self._prefetch is not None else None):
            if step is None:
                continue
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - raised below, after the rest is stopped
                errors.append(e)
        if errors:
            raise errors[0]

    @property
    def released(self) -> bool:
        """close() or discard() ran: this request holds no thread and no DRAM reservation."""
        return self._closed or self._discarded

    def discard(self) -> None:
        """Drop this request for good, releasing everything it holds, and raise nothing: for an owner
        that has no use for the request any more (a cache reset for the next prompt, a cache collected),
        where `close` would raise the old request's save errors into the next one.

        The prefetcher's read in flight is waited for and its thread ends; the writer's queued jobs are
        skipped and the one running is waited for, so nothing of this request writes after this returns;
        the saves they leave uncommitted (a span whose layers were not all appended or written) give
        back their DRAM reservations, and their blocks, never published, are read by nobody (their keys
        are this request's own). What is committed is the store's: its lower-tier writes go on. The save
        errors no caller was told of (a failed background write, blocks the store refused or failed to
        store) are logged once, at warning level: those known now here, those of saves still writing
        by a thread that waits for them (the request's tensors are not kept for it). Its working sets
        and summaries are dropped. Idempotent; append and attend raise after it, flush and close do
        nothing."""
        if self._discarded:
            return
        self._discarded = True
        request = f"request {self._root[:6].hex()}"
        problems: list[str] = []
        if self._prefetch is not None:
            self._quietly(self._prefetch.close, problems, "stopping its prefetcher")
        failed = self._writer.abandon() if self._writer is not None else None
        if failed is not None:
            problems.append(f"a background write of its KV failed: {failed!r}")
        self._quietly(self._abort_uncommitted, problems, "aborting its uncommitted saves")
        # the bulk of its device memory, freed now rather than when the collector finds the request
        self.release_prefill()
        self.working, self.tables = [], []
        saves = list(self._saves)  # the writer is idle: nothing is appended meanwhile
        self._saves.clear()
        if all(save.handle is not None and save.handle.done() for save in saves):
            for save in saves:
                self._quietly(functools.partial(self._check_save, save), problems, "checking its saves")
        else:  # their writes go on: checked when they end, without holding this request's tensors
            threading.Thread(target=_report_dropped_saves, args=(self.store, saves, request),
                             name="kvtier-sparse-discard", daemon=True).start()
        if len(self._unstored) > self._reported:
            problems.append(_not_stored(self._unstored[self._reported:]))
            self._reported = len(self._unstored)
        if problems:
            log.warning("sparse %s (discarded, so not raised): %s", request, "; ".join(problems))

    @staticmethod
    def _quietly(step: Callable[[], None], problems: list[str], what: str) -> None:
        """Run one step of `discard`; an error is noted for its warning, never raised."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - discard raises nothing: logged with the request's other errors
            problems.append(f"{what} failed: {e!r}")

    def _abort_uncommitted(self) -> None:
        """Abort the saves begun and not committed (the span being appended, whose batch holds DRAM
        slots until a commit that will not come, and any whose jobs the writer skipped); the writer is
        idle. Their blocks were never stored. A committed or aborted batch ignores the abort."""
        self._open = None
        self._span.clear()
        spans, self._uncommitted = self._uncommitted, []
        for span in spans:
            if span.batch is not None:
                span.batch.abort()

    # -- reading -------------------------------------------------------------------
    def _section(self, layer: int, head: int, plane: int) -> int:
        """Store section of `plane` (0 = K, 1 = V) of `head` in `layer`."""
        return (layer * self.layout.num_kv_heads + head) * 2 + plane

    def _missing(self, layer: int, what: str, blocks: list[int]) -> BlockMissingError:
        return BlockMissingError(
            f"layer {layer}{what}: blocks {blocks[:8]} of this request are in no tier of the store, or "
            f"failed their checksum (evicted, lost or corrupt); refusing to attend without them"
        )

    def _fill(self, layer: int, heads: np.ndarray, blocks: np.ndarray, slots: np.ndarray) -> None:
        """The working set's `fill`: K and V of block blocks[i] of head heads[i] into slot slots[i],
        read from the store in one batched call, every section verified (or copied from the span being saved).

        The store reads run in this thread: a decode step reads a few slices per head and waits
        for them, so a hop to the store's worker and back would cost more than the copies."""
        ws = self.working[layer]
        span = self._span.get(layer)
        if span is not None and int(blocks.max()) >= span[0]:
            first, sk, sv = span
            bt = self.config.block_tokens
            fresh = blocks >= first
            if fresh.any():
                # one gather of the span's blocks for every (head, block) pair, on the device
                th, tb = host_indices_to(sk.device, heads[fresh], blocks[fresh] - first)
                ws.write_slots(heads[fresh], slots[fresh], sk.unflatten(1, (-1, bt))[th, tb],
                               sv.unflatten(1, (-1, bt))[th, tb])
            heads, blocks, slots = heads[~fresh], blocks[~fresh], slots[~fresh]
        if self._prefetch is not None and len(heads):
            heads, blocks, slots = self._fill_prefetched(layer, heads, blocks, slots)
        if not len(heads):
            return
        if self.stage_fetches:
            self._fill_staged(layer, heads, blocks, slots)
            return
        kb, vb = ws.byte_views()
        t0 = time.perf_counter()
        try:
            self._read_slices(layer, heads, blocks, [[kb[h, sl], vb[h, sl]] for h, sl in zip(heads.tolist(), slots.tolist())])
        finally:
            self.fetch_seconds += time.perf_counter() - t0

    def _fill_prefetched(self, layer: int, heads: np.ndarray, blocks: np.ndarray,
                         slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fill the pairs the last prefetch of `layer` read ahead (one indexed device copy per plane);
        returns the pairs still to read from the store."""
        assert self._prefetch is not None
        got = self._prefetch.take(layer)
        if got is None:
            return heads, blocks, slots
        self.fetched_bytes += 2 * self._section_bytes * len(got.heads)  # read from the store, ahead
        row = got.lookup(heads, blocks, 1 << 32)
        hit = row >= 0
        if hit.any():
            (idx,) = host_indices_to(got.rows.device, row[hit])
            picked = got.rows.index_select(0, idx)  # one gather of K and V
            self.working[layer].write_slots(heads[hit], slots[hit], picked[:, 0], picked[:, 1])
            self._prefetch.used_slices += int(hit.sum())
        return heads[~hit], blocks[~hit], slots[~hit]

    def _read_slices(self, layer: int, heads: np.ndarray, blocks: np.ndarray, dests: list[list[np.ndarray]]) -> None:
        """K and V sections of block blocks[i] of head heads[i] of `layer` into dests[i] (two buffers):
        one batched, verified store read for all of them; BlockMissingError names what no tier held."""
        self._await_writes()
        self._store_read(layer, heads, blocks, dests)
        self.fetched_bytes += 2 * self._section_bytes * len(blocks)

    def _store_read(self, layer: int, heads: np.ndarray, blocks: np.ndarray, dests: list[list[np.ndarray]]) -> None:
        """The store read of `_read_slices` alone, into separate K and V buffers per pair."""
        keys = self.block_keys
        bl = blocks.tolist()
        hs = heads.tolist()
        base = layer * self.layout.num_kv_heads
        result = self.store.load_here_each([keys[b] for b in bl], dests,
                                           [((base + h) * 2, (base + h) * 2 + 1) for h in hs])
        if result.failed:
            self._raise_missing(layer, hs, bl, result.failed)

    def _store_gather(self, layer: int, heads: np.ndarray, blocks: np.ndarray, out: np.ndarray) -> None:
        """K and V of block blocks[i] of head heads[i] of `layer` into row i of out ([n, 2, section
        bytes] uint8): one `gather_here` (a head's K and V are consecutive sections, one run of bytes
        in the chunk), so hundreds of slices cost one batched copy, not a store call each. Also the
        prefetcher's read, on its worker thread. BlockMissingError names what no tier held."""
        keys = self.block_keys
        bl = blocks.tolist()
        sections = (layer * self.layout.num_kv_heads + heads) * 2
        result = self.store.gather_here([keys[b] for b in bl], sections, 2, out.reshape(len(bl), -1))
        if result.failed:
            self._raise_missing(layer, heads.tolist(), bl, result.failed)

    def _raise_missing(self, layer: int, hs: list[int], bl: list[int], failed: Sequence[int]) -> None:
        bad = sorted({hs[i] for i in failed})
        raise self._missing(layer, f" head{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}",
                            [bl[i] for i in failed])

    def _fill_staged(self, layer: int, heads: np.ndarray, blocks: np.ndarray, slots: np.ndarray) -> None:
        """`_fill` for working sets off the host: every slice is read (verified) into row i of the
        reused host staging buffer, then all of them go to the device in one copy (pinned memory and
        a side stream on CUDA) and into their slots in one indexed write per plane."""
        ws = self.working[layer]
        bt, d = self.config.block_tokens, self.layout.head_size
        rows = self._fill_staging.rows(len(heads))
        arr = rows.numpy()
        t0 = time.perf_counter()
        try:
            self._await_writes()
            self._store_gather(layer, heads, blocks, arr)
            self.fetched_bytes += 2 * self._section_bytes * len(blocks)
            on_device = self._fill_staging.to_device(rows).view(self.dtype).reshape(len(heads), 2, bt, d)
            ws.write_slots(heads, slots, on_device[:, 0], on_device[:, 1])
        finally:
            self.fetch_seconds += time.perf_counter() - t0

    def _fetch(self, layer: int, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [n, H, B, d] of every head of `blocks` of `layer` (streamed dense attention and
        the oracle), read from the store (or the span being saved), every section verified.

        The tensors returned are views of a reused staging buffer: use them before the next fetch."""
        h, d, bt = self.layout.num_kv_heads, self.layout.head_size, self.config.block_tokens
        span = self._span.get(layer)
        if span is not None and blocks and blocks[-1] >= span[0]:
            first, sk, sv = span
            stored = [b for b in blocks if b < first]
            k, v = self._fetch(layer, stored) if stored else (None, None)
            new = torch.tensor([b - first for b in blocks if b >= first], device=sk.device)
            nk = sk.unflatten(1, (-1, bt))[:, new].transpose(0, 1)
            nv = sv.unflatten(1, (-1, bt))[:, new].transpose(0, 1)
            if k is None or v is None:
                return nk, nv
            return torch.cat([k, nk]), torch.cat([v, nv])
        self._await_writes()
        sb = self._section_bytes
        if self._staging.shape[0] < len(blocks):
            # grow-only and reused: a fresh buffer of this size comes from mmap and faults in every
            # page on each fetch (measured: 0.4 ms per 512 KiB block, 4x the copy itself)
            self._staging = torch.empty(max(len(blocks), 2 * self._staging.shape[0]), h, 2, sb, dtype=torch.uint8)
        staging = self._staging[: len(blocks)]
        arr = staging.numpy()
        sections = [self._section(layer, head, plane) for head in range(h) for plane in range(2)]
        dests = [[arr[i, head, plane] for head in range(h) for plane in range(2)] for i in range(len(blocks))]
        result = self.store.load_here([self.block_keys[b] for b in blocks], dests, sections)
        if result.failed:
            raise self._missing(layer, "", [blocks[i] for i in result.failed])
        self.fetched_bytes += 2 * h * sb * len(blocks)
        kv = staging.view(self.dtype).reshape(len(blocks), h, 2, bt, d)
        if self.device.type != "cpu":
            kv = kv.to(self.device)
        return kv[:, :, 0], kv[:, :, 1]

    def _select(self, layer: int, q: torch.Tensor, nb: int, scaling: float) -> torch.Tensor:
        """Blocks the working set must hold: [H, m] int64 on the device, rows padded with EMPTY."""
        cfg = self.config
        ws = self.working[layer]
        h = q.shape[0]
        sinks = min(cfg.sink_blocks, nb)
        lo, hi = sinks, max(sinks, nb - cfg.window_blocks)
        k = ws.slots - sinks - (nb - hi)
        if self.policy.dense or hi - lo <= k:
            if nb > ws.slots:
                ws.grow(nb)
            return torch.arange(nb, device=self.device).expand(h, nb)
        step = self._steps[layer]
        self._steps[layer] += 1
        prev = self._picks[layer]
        if prev is not None and step % cfg.retrieval_stride and prev.shape[1] == k:
            picks = torch.where(prev < hi, prev, torch.full_like(prev, EMPTY))
        else:
            keys = self._candidate_keys(layer, lo, hi) if self.policy.needs_keys else None
            pri = self.policy.priority(q.float(), self.tables[layer], lo, hi, scaling, keys)
            held = ws.holds(lo, hi) if cfg.keep_margin else None
            picks = sticky_topk(pri, held, k, cfg.keep_margin) + lo
            p = min(cfg.prefetch_blocks, hi - lo - k)
            if self._prefetch is not None and p > 0:  # the runners-up: the picks masked out, then top p
                rest = pri.float().scatter(1, picks - lo, float("-inf"))
                self._runners = torch.topk(rest, p, dim=1, sorted=False).indices + lo
        self._picks[layer] = picks
        # sinks, then the window, then the picks: on the device, as the slot bookkeeping
        always = torch.cat((torch.arange(lo, device=picks.device), torch.arange(hi, nb, device=picks.device)))
        return torch.cat((always.expand(h, -1), picks), 1)

    def _candidate_keys(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        k, _ = self._fetch(layer, list(range(lo, hi)))  # [n, H, B, d]
        return k.permute(1, 0, 2, 3).reshape(k.shape[1], -1, k.shape[-1]).float()

    def attend(self, layer: int, q: torch.Tensor, scaling: float, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [Hq, nq, d] of queries q [Hq, nq, d] at the last nq positions.

        `token_mask` [nq, T] (True = may attend) carries padding; causality is applied here.
        """
        if self._discarded:
            raise RuntimeError("attend of a discarded SparseKV")
        ws = self.working[layer]
        if self._gathered or self._gather_parts:
            self.release_prefill()  # prefill is over: decode holds only working sets, summaries, staging
        hq, nq, d = q.shape
        h = self.layout.num_kv_heads
        if hq % h:
            raise SparseConfigError(f"{hq} query heads is not a multiple of {h} KV heads")
        g = hq // h
        bt = self.config.block_tokens
        t = self.num_tokens[layer]
        nb = t // bt
        qg = q.reshape(h, g * nq, d)
        self._runners = None
        wanted = self._select(layer, qg, nb, scaling)
        runners, self._runners = self._runners, None
        ws.ensure(wanted, lambda heads, blocks, slots: self._fill(layer, heads, blocks, slots), n_blocks=nb,
                  also=runners)
        if self._prefetch is not None and runners is not None:
            guess_heads, guess_pos = (ws.also_missing != EMPTY).nonzero()
            self._await_writes()  # the worker reads only blocks already in the store
            self._prefetch.start(layer, guess_heads, ws.also_missing[guess_heads, guess_pos], self.dtype,
                                 (self.config.block_tokens, self.layout.head_size))
        valid = ws.token_mask().unsqueeze(1)  # [H, 1, L]: selected slots and the tail's tokens
        if nq > 1 or token_mask is not None:
            pos = ws.token_positions(nb * bt)  # [H, L]
            if nq > 1:
                qpos = torch.arange(t - nq, t, device=pos.device)
                valid = valid & (pos.unsqueeze(1) <= qpos.view(1, nq, 1))  # [H, nq, L]
            if token_mask is not None:
                tm = token_mask[:, pos.clamp(0, t - 1)].permute(1, 0, 2)  # [H, nq, L]
                valid = valid & tm
        mask = valid if nq == 1 else valid.unsqueeze(1).expand(h, g, nq, -1).reshape(h, g * nq, -1)
        kk = ws.k.reshape(h, -1, d)
        vv = ws.v.reshape(h, -1, d)
        out = attention_kernel(qg.to(kk.dtype), kk, vv, mask, scaling)
        return out.reshape(hq, nq, d).to(q.dtype)

    def attend_dense(self, layer: int, q: torch.Tensor, scaling: float,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exact attention over the whole context (chunked prefill after the first chunk).

        A context of at most `sparse.dense_stream_tokens` is gathered from the store in one read and
        attended by one fused sdpa call, all heads at once: the streamed online-softmax below, run
        piece by piece in unfused float32 ops, made a 4k-token chunked prefill 3.5x slower than
        plain sdpa on the CPU. Longer contexts stream in pieces of that many tokens (or `slots`
        blocks, if more), merged by online softmax, so a layer never holds more than a piece."""
        if self._discarded:
            raise RuntimeError("attend of a discarded SparseKV")
        ws = self.working[layer]
        hq, nq, d = q.shape
        h = self.layout.num_kv_heads
        if hq % h:
            raise SparseConfigError(f"{hq} query heads is not a multiple of {h} KV heads")
        g = hq // h
        bt = self.config.block_tokens
        t = self.num_tokens[layer]
        nb = t // bt
        dev = q.device
        qpos = torch.arange(t - nq, t, device=dev).repeat(g)  # row r of a head is query token r % nq
        step = self._gather_blocks(layer)
        if nb <= step:
            return self._attend_gathered(layer, q, scaling, token_mask, qpos)
        self._gathered.pop(layer, None)
        self._gather_buf.pop(layer, None)
        self._gather_parts.pop(layer, None)
        # matmuls in float32 on the CPU (the measured results), in the KV's dtype with float32 softmax
        # state on an accelerator (as its fused sdpa computes); scores are made for at most
        # _STREAM_SCORE_BYTES of query rows at a time, so a long chunk never materializes [H, rows, piece]
        mm = torch.float32 if dev.type == "cpu" else ws.k.dtype
        rows = g * nq
        qg = q.reshape(h, rows, d).to(mm)
        m_run = torch.full((h, rows, 1), float("-inf"), device=dev)
        l_run = torch.zeros(h, rows, 1, device=dev)
        o_run = torch.zeros(h, rows, d, device=dev)

        def merge(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
            kt, vm = k.to(mm).transpose(1, 2), v.to(mm)
            per = max(1, _STREAM_SCORE_BYTES // (4 * h * max(1, pos.numel())))
            for r0 in range(0, rows, per):
                r = slice(r0, min(rows, r0 + per))
                sc = (qg[:, r] @ kt).float() * scaling  # [H, R, L]
                ok = pos.view(1, -1) <= qpos[r].view(-1, 1)  # [R, L]
                if token_mask is not None:
                    ok = ok & token_mask[:, pos].repeat(g, 1)[r]
                sc = sc.masked_fill(~ok, float("-inf"))
                m_old = m_run[:, r]
                m_new = torch.maximum(m_old, sc.amax(-1, keepdim=True))
                safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(sc - safe)
                corr = torch.exp(m_old - safe)
                l_run[:, r] = l_run[:, r] * corr + p.sum(-1, keepdim=True)
                o_run[:, r] = o_run[:, r] * corr + (p.to(mm) @ vm).float()
                m_run[:, r] = m_new

        for lo in range(0, nb, step):
            blocks = list(range(lo, min(nb, lo + step)))
            k, v = self._fetch(layer, blocks)
            merge(k.permute(1, 0, 2, 3).reshape(h, -1, d), v.permute(1, 0, 2, 3).reshape(h, -1, d),
                  torch.arange(lo * bt, (lo + len(blocks)) * bt, device=dev))
        tk, tv = ws.tail()
        if ws.tail_len:
            merge(tk, tv, torch.arange(nb * bt, t, device=dev))
        return (o_run / l_run).reshape(hq, nq, d).to(q.dtype)

    def _attend_gathered(self, layer: int, q: torch.Tensor, scaling: float, token_mask: torch.Tensor | None,
                         qpos: torch.Tensor) -> torch.Tensor:
        """`attend_dense` over the stored blocks and the tail gathered at once: one fused sdpa with
        a causal (+ padding) mask, in float32 on the CPU and the KV's dtype on an accelerator."""
        ws = self.working[layer]
        hq, nq, d = q.shape
        h = self.layout.num_kv_heads
        g = hq // h
        t = self.num_tokens[layer]
        nb = t // self.config.block_tokens
        dtype = torch.float32 if q.device.type == "cpu" else ws.k.dtype
        self._gather_pending(layer)
        have = self._gathered[layer][0] if layer in self._gathered else 0
        if nb > have:  # only the blocks completed since the last chunk (mostly still on the device, in _span)
            k, v = self._fetch(layer, list(range(have, nb)))  # [n, H, B, d]
            self._gather_append(layer, k.permute(1, 0, 2, 3).reshape(h, -1, d).to(q.device, dtype),
                                v.permute(1, 0, 2, 3).reshape(h, -1, d).to(q.device, dtype))
        gk: torch.Tensor | None = None
        gv: torch.Tensor | None = None
        if layer in self._gathered:
            _, gk, gv = self._gathered[layer]
        tk, tv = ws.tail()
        kk = torch.cat([gk, tk.to(dtype)], 1) if gk is not None else tk.to(dtype)
        vv = torch.cat([gv, tv.to(dtype)], 1) if gv is not None else tv.to(dtype)
        pos = torch.arange(t, device=q.device)
        ok = pos.view(1, -1) <= qpos[:nq].view(-1, 1)  # [nq, t], the same for every head
        if token_mask is not None:
            ok = ok & token_mask[:, :t]
        # [1, Hq, nq, d] against [1, H, t, d] with enable_gqa, as transformers' sdpa calls it: the
        # shape the CPU's flash kernel takes (query heads folded into rows ran ~2x slower)
        out = F.scaled_dot_product_attention(q.unsqueeze(0).to(dtype), kk.unsqueeze(0), vv.unsqueeze(0), attn_mask=ok,
                                             scale=scaling, enable_gqa=g > 1)
        return out[0].to(q.dtype)

    def release_prefill(self) -> None:
        """Free what a chunked prefill kept on the device for the next chunk: every layer's gathered
        context (up to `dense_stream_tokens` of KV per layer, as much as a dense cache holds). Decode
        drops it at its first step; a caller that measures decode memory releases it before. A later
        chunked prefill reads the context back from the store."""
        self._gathered.clear()
        self._gather_buf.clear()
        self._gather_parts.clear()

    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this request holds on its device (or host, for a CPU request), by kind: what
        `device_bytes` counts, for accounting tests and the bench's breakdown."""
        return {
            "working_sets": [t for ws in self.working for t in (ws.k, ws.v)],
            "summaries": [t for table in self.tables for t in table.tensors()],
            "prefill_gathered": [t for pair in self._gather_buf.values() for t in pair]
            + [t for parts in self._gather_parts.values() for pair in parts for t in pair],
            "span": [t for _, sk, sv in self._span.values() for t in (sk, sv)],
        }

    def device_bytes(self) -> dict[str, int]:
        """Bytes of `device_tensors` by kind."""
        return {kind: sum(t.numel() * t.element_size() for t in ts) for kind, ts in self.device_tensors().items()}

    # -- accounting ----------------------------------------------------------------
    def fast_tier_bytes(self) -> int:
        """Bytes held in fast memory: every layer's working set (slots + tail) and summary table."""
        return sum(ws.nbytes for ws in self.working) + sum(t.nbytes for t in self.tables)

    def summary_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    def budget_bytes(self) -> int:
        """KV bytes of the token budget over all layers."""
        return self.config.budget_tokens * self.layout.token_bytes_per_layer() * self.layout.num_layers
