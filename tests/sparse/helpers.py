"""Small stores and SparseKVs for the sparse tests."""

from __future__ import annotations

import torch

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.sparse import SparseConfig, SparseKV, sparse_store_layout
from kvtier.store.tiered import TieredStore

LAYOUT = KVLayout(2, 2, 8)  # the model KV layout of make_store's defaults


def make_store(layers: int = 2, kv_heads: int = 2, head_size: int = 8, block: int = 4,
               memory_bytes: int = 1 << 22, disk_root: str | None = None) -> TieredStore:
    """A store holding KVLayout(layers, kv_heads, head_size) per KV head, as SparseKV needs."""
    layout = sparse_store_layout(KVLayout(layers, kv_heads, head_size))
    disk = DiskTierConfig(root=disk_root, capacity_bytes=1 << 26) if disk_root else None
    memory = MemoryTierConfig(capacity_bytes=memory_bytes) if memory_bytes else None
    return TieredStore(StoreConfig(chunk_tokens=block, memory=memory, disk=disk), layout)


def fill(kv: SparseKV, k: torch.Tensor, v: torch.Tensor, first_span: int) -> None:
    """Append k, v [L, H, T, d]: a prefill of `first_span` tokens, then one token at a time."""
    layers, _, t, _ = k.shape
    for layer in range(layers):
        kv.append(layer, k[layer, :, :first_span], v[layer, :, :first_span])
    for i in range(first_span, t):
        for layer in range(layers):
            kv.append(layer, k[layer, :, i : i + 1], v[layer, :, i : i + 1])


def config(policy: str = "quest", budget: int = 16, block: int = 4, sinks: int = 4, window: int = 4,
           **kw) -> SparseConfig:
    return SparseConfig(policy=policy, budget_tokens=budget, block_tokens=block, sink_tokens=sinks,
                        window_tokens=window, **kw)


def dense_chunk_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, scale: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention of queries q [Hq, hi - lo, d] at positions lo..hi-1 over k, v [H, >= hi, d]
    (Hq a multiple of H: grouped queries), causal, and-ed with `mask` [hi - lo, hi] when given: the
    reference for SparseKV.attend_dense after a chunked prefill."""
    import torch.nn.functional as F

    group = q.shape[0] // k.shape[0]
    causal = torch.arange(hi).view(1, -1) <= torch.arange(lo, hi).view(-1, 1)
    return F.scaled_dot_product_attention(
        q.unsqueeze(0), k[:, :hi].repeat_interleave(group, 0).unsqueeze(0),
        v[:, :hi].repeat_interleave(group, 0).unsqueeze(0),
        attn_mask=causal if mask is None else causal & mask, scale=scale)[0]
