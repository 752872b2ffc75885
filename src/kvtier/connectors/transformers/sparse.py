"""Sparse decoding for transformers: `attn_implementation="kvtier_sparse"` plus KVTierSparseCache.

    register(name="kvtier_sparse")      add the attention function and its mask function to
                                        transformers' registries (idempotent); returns the name
    KVTierSparseCache(store, config, model_config=)  a Cache whose layers keep each sequence's full
                                        KV in the TieredStore (one SparseKV per batch row); the
                                        store's layout is sparse_store_layout(model's KV layout)
    prefill(model, input_ids, cache, chunk_tokens)  dense prefill in chunks, blocks written as it goes

The cache owns its sequences. `close()` flushes them and raises what their saves left unstored;
`reset()` (transformers' name; `discard()` here) drops them for the next prompt without raising
the old request's errors (SparseKV.discard: threads stopped, uncommitted saves' DRAM reservations
given back, errors logged), and a cache collected unclosed discards them as well.

Usage on a stock Llama-family model:

    register()
    model.set_attn_implementation("kvtier_sparse")   # or from_pretrained(..., attn_implementation=...)
    store = TieredStore(store_config, sparse_store_layout(model_layout(model)))
    cache = KVTierSparseCache(store, SparseConfig(policy="quest", budget_tokens=4096), model_config=model.config)
    model.generate(ids, past_key_values=cache, ...)

The handshake. transformers calls `cache.update(k, v, layer)` before attention, and update
never sees the query; the attention function is not handed the cache. So update appends the
new tokens to the sequence's SparseKV (whole blocks go to the store with their summaries)
and, once the cache holds a past, returns the new k/v tagged with a `SparseStep` attribute;
the attention function finds the tag on its `key` argument and asks the SparseKV of each
row for sparse attention of the query. The first forward (no past) returns the full k/v
untagged and attention is exactly transformers' sdpa (prefill stays dense); a later forward
of several tokens (chunked prefill) is exact attention streamed from the store. The mask
function is transformers' sdpa_mask, so causal and padding masks arrive as for "sdpa" (an
implementation without a registered mask function would receive none).

Without a KVTierSparseCache (a plain DynamicCache) the function is plain sdpa: dense.
Unsupported (UnsupportedModelError): sliding-window layers, attention sinks (s_aux), logit
soft-capping, K and V of different head sizes (MLA), training mode, beam reordering.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvtier.connectors.transformers.compat import decoder_config
from kvtier.connectors.transformers.identity import TORCH_DTYPES, config_layout
from kvtier.core.errors import LayoutMismatchError
from kvtier.core.layout import KVLayout
from kvtier.sparse.config import SparseConfig
from kvtier.sparse.errors import UnsupportedModelError
from kvtier.sparse.kv import SparseKV, sparse_store_layout
from kvtier.store.tiered import TieredStore

ATTN_NAME = "kvtier_sparse"
_TAG = "_kvtier_sparse_step"


@dataclass(slots=True, frozen=True)
class SparseStep:
    """What the cache's update hands to the attention function through the key tensor."""

    layer_idx: int
    sequences: tuple[SparseKV, ...]


def sparse_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function registered with the attention: sdpa's boolean causal + padding mask."""
    return sdpa_mask(*args, **kwargs)


def check_supported(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Raise UnsupportedModelError for attention variants sparse decoding does not implement."""
    cls = type(module).__name__
    if module.training:
        raise UnsupportedModelError(f"{cls}: kvtier_sparse attention is for inference; call model.eval()")
    if getattr(module, "sliding_window", None) is not None:
        raise UnsupportedModelError(f"{cls}: sliding-window attention layers are not supported by kvtier_sparse")
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise UnsupportedModelError(f"{cls}: learned attention sinks (s_aux) are not supported by kvtier_sparse")
    if kwargs.get("softcap") or getattr(getattr(module, "config", None), "attn_logit_softcapping", None):
        raise UnsupportedModelError(f"{cls}: attention logit soft-capping is not supported by kvtier_sparse")
    if key.shape[-1] != value.shape[-1]:
        raise UnsupportedModelError(f"{cls}: K and V head sizes differ ({key.shape[-1]} vs {value.shape[-1]}, "
                                    "e.g. MLA); kvtier_sparse needs one head size")


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: query [b, Hq, nq, d] -> output [b, nq, Hq, d]."""
    check_supported(module, key, value, kwargs)
    step: SparseStep | None = getattr(key, _TAG, None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    b, _, nq, _ = query.shape
    outs = []
    for i, seq in enumerate(step.sequences):
        token_mask = None
        if attention_mask is not None:
            row = attention_mask[i if attention_mask.shape[0] == b else 0, 0]
            token_mask = row if row.dtype == torch.bool else row == 0
            token_mask = token_mask.expand(nq, -1)
        q = query[i].detach()  # attention runs where the model's tensors are
        if nq == 1:
            out = seq.attend(step.layer_idx, q, scale, token_mask)
        else:
            out = seq.attend_dense(step.layer_idx, q, scale, token_mask)
        outs.append(out)
    attn = torch.stack(outs).to(query.dtype).transpose(1, 2).contiguous()
    return attn, None


def register(name: str = ATTN_NAME) -> str:
    """Register the attention and mask functions under `name` (idempotent); returns the name."""
    AttentionInterface.register(name, sparse_attention_forward)
    AttentionMaskInterface.register(name, sparse_mask)
    return name


class SparseCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: KVTierSparseCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        want = self.owner.layout.dtype
        if TORCH_DTYPES.get(key_states.dtype) != want:  # cast silently, KV would be rounded: dense no longer equal
            raise LayoutMismatchError(f"layer {self.layer_idx}: the model's KV is {key_states.dtype}, the sparse "
                                      f"store holds {want}: open the store with the model's dtype")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.owner._ensure_sequences(key_states.shape[0], key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seqs = self.owner.sequences
        if key_states.shape[0] != len(seqs):
            raise ValueError(f"batch of {key_states.shape[0]} rows, but the cache holds {len(seqs)} sequences")
        k = key_states.detach()  # SparseKV summarizes and keeps its working set on this device
        v = value_states.detach()
        for i, seq in enumerate(seqs):
            seq.append(self.layer_idx, k[i], v[i])
        past = self.seen
        self.seen += key_states.shape[2]
        if past == 0:
            return key_states, value_states
        setattr(key_states, _TAG, SparseStep(self.layer_idx, tuple(seqs)))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """transformers' Cache.reset calls this for every layer: the first call drops the sequences
        (and resets every layer), the others find nothing left."""
        self.owner.discard()

    def clear(self) -> None:
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVTierSparseCache does not support beam search reordering")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVTierSparseCache cannot crop: stored blocks are immutable")


class KVTierSparseCache(Cache):
    """A transformers Cache whose KV lives in a TieredStore, read back through budgeted working sets."""

    def __init__(self, store: TieredStore, config: SparseConfig, *, model_config: Any = None,
                 layout: KVLayout | None = None, salts: Sequence[bytes] | None = None) -> None:
        """The model's KV layout comes from `model_config` (checked against the store's layout), or
        is given as `layout`; the store's layout must be sparse_store_layout(it)."""
        if model_config is not None:
            found = model_kv_layout(model_config, store.layout.dtype)
            if layout is not None and layout != found:
                raise LayoutMismatchError(f"layout {layout} differs from the model's {found}")
            layout = found
        if layout is None:
            raise ValueError("KVTierSparseCache needs the model's KV layout: pass model_config= or layout=")
        if store.layout != sparse_store_layout(layout):
            raise LayoutMismatchError(
                f"the model's KV layout {layout} needs a store opened with sparse_store_layout({layout}) "
                f"= {sparse_store_layout(layout)}, got {store.layout}")
        self.store = store
        self.config = config
        self.layout = layout
        # one list for the cache's life, changed in place: the finalizer below holds it
        self.sequences: list[SparseKV] = []
        self._salts = list(salts) if salts is not None else None
        self._layers = [SparseCacheLayer(self, i) for i in range(layout.num_layers)]
        super().__init__(layers=list(self._layers))
        # a cache dropped unclosed (generate's caller moved on, an exception) discards its sequences
        # when collected: their threads and DRAM reservations are not kept for the process's life
        finalizer = weakref.finalize(self, _discard_later, self.sequences)
        finalizer.atexit = False  # the process is ending: nothing to give back to

    def _ensure_sequences(self, batch: int, device: torch.device | None = None) -> None:
        if self.sequences:
            if len(self.sequences) != batch:
                raise ValueError(f"batch of {batch} rows, but the cache holds {len(self.sequences)} sequences")
            return
        salts = self._salts or [None] * batch  # type: ignore[list-item]
        if len(salts) != batch:
            raise ValueError(f"{len(salts)} salts for a batch of {batch}")
        self.sequences[:] = [SparseKV(self.store, self.config, self.layout, salt=s, device=device) for s in salts]

    def fast_tier_bytes(self) -> int:
        return sum(s.fast_tier_bytes() for s in self.sequences)

    def fetched_bytes(self) -> int:
        return sum(s.fetched_bytes for s in self.sequences)

    def flush(self) -> None:
        for s in self.sequences:
            s.flush()

    def release_prefill(self) -> None:
        """Free the context a chunked prefill kept gathered on the device (decode frees it at its
        first step anyway; call this first when measuring decode's memory)."""
        for s in self.sequences:
            s.release_prefill()

    def discard(self) -> None:
        """Drop every sequence (SparseKV.discard: its threads stopped, what it holds given back, its
        save errors logged, not raised) and start afresh: the next forward is a new prompt. What
        transformers' `reset()` does; never raises the old request's errors into the next one."""
        dropped = list(self.sequences)
        self.sequences.clear()
        for layer in self._layers:
            layer.clear()
        for s in dropped:
            s.discard()

    def close(self) -> None:
        """Flush every sequence's writes and stop its background writer and prefetcher: every
        sequence, whatever another raises; the first error is raised after."""
        errors: list[BaseException] = []
        for s in self.sequences:
            try:
                s.close()
            except BaseException as e:  # noqa: BLE001 - raised below, after every row is closed
                errors.append(e)
        if errors:
            raise errors[0]


_DISCARDS: set[threading.Thread] = set()  # finalizers' discards still running (joined at exit)
_DISCARDS_LOCK = threading.Lock()
EXIT_WAIT_S = 30.0  # at interpreter exit, how long the discards still running are waited for in all


def _discard_later(sequences: list[SparseKV]) -> None:
    """A collected cache's finalizer: discard the sequences not closed. The collector may run it on
    any thread (a sequence's writer, the store's I/O threads), where waiting for a writer would wait
    for itself; so it waits nowhere and hands the work to a thread of its own. That thread is waited
    for at interpreter exit (a bounded wait, _join_discards): torch tearing down under a discard
    still freeing tensors aborts the process ("terminate called without an active exception")."""
    live = [s for s in sequences if not s.released]
    if not live or sys.is_finalizing():
        return
    thread = threading.Thread(target=_discard_all, args=(live,), name="kvtier-sparse-discard", daemon=True)
    with _DISCARDS_LOCK:
        _DISCARDS.add(thread)
    thread.start()


def _discard_all(sequences: list[SparseKV]) -> None:
    try:
        for s in sequences:
            s.discard()
    finally:
        with _DISCARDS_LOCK:
            _DISCARDS.discard(threading.current_thread())


@atexit.register
def _join_discards() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    with _DISCARDS_LOCK:
        running = list(_DISCARDS)
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))


def model_kv_layout(model_config: Any, dtype: str) -> KVLayout:
    """The model's KV layout (layers, KV heads, head size) in `dtype`; UnsupportedModelError for
    models kvtier_sparse cannot attend for."""
    layout = config_layout(model_config, dtype)
    cfg = decoder_config(model_config)
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        layer_types = getattr(cfg, "layer_types", None) or []
        if not layer_types or any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError("models with sliding-window layers are not supported by kvtier_sparse")
    return layout


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: KVTierSparseCache,
            chunk_tokens: int = 2048) -> torch.Tensor:
    """Dense prefill in chunks (the first chunk by sdpa, later ones streamed from the store);
    returns the logits of the last position [b, vocab]. No padding (use model() for that)."""
    logits = None
    with torch.no_grad():
        for lo in range(0, input_ids.shape[1], chunk_tokens):
            out = model(input_ids=input_ids[:, lo : lo + chunk_tokens], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
    assert logits is not None, "empty input"
    return logits
