"""Helpers for the prefix-cache tests: tiny models and stores, reference outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from kvtier.bench.models import load_stories260k, random_llama, stories_available
from kvtier.connectors.transformers import TransformersConnector, model_layout
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.store.tiered import TieredStore

CHUNK = 4
TOL = 1e-4
GAP = 1e-3


def tiny_model(seed: int = 0, **kw: int) -> torch.nn.Module:
    args = dict(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, max_positions=512, seed=seed)
    args.update(kw)
    return random_llama(**args)


def model_named(name: str) -> torch.nn.Module:
    if name == "stories":
        return load_stories260k()
    return tiny_model()


STORIES_SKIP = (not stories_available(), "stories260K weights not found under ../shared/models (KVTIER_SHARED_MODELS)")


def make_store(model: torch.nn.Module, root: Path | None, *, memory: int | None = 1 << 24, chunk: int = CHUNK,
               read_only: bool = False, dtype: torch.dtype | None = None) -> TieredStore:
    mem = MemoryTierConfig(capacity_bytes=memory) if memory is not None else None
    disk = DiskTierConfig(root=str(root), read_only=read_only) if root is not None else None
    return TieredStore(StoreConfig(chunk_tokens=chunk, memory=mem, disk=disk), model_layout(model, dtype))


def prompt(vocab: int, n: int, seed: int, first: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(first, vocab, (1, n), generator=g)


def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1]


def hit_logits(conn: TransformersConnector, ids: torch.Tensor, mask: torch.Tensor | None = None):
    cache, out = conn.prefill(ids, mask)
    return cache.last_plan, out.logits[:, -1]


def greedy_agree(model: torch.nn.Module, ids: torch.Tensor, got: torch.Tensor, new: int) -> None:
    """Tokens of `got` equal greedy decoding wherever the reference's top-2 logit gap exceeds GAP.

    Compares step by step; after the first near-tie the continuations may legitimately differ,
    so the comparison stops there."""
    ref = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    start = ids.shape[1]
    for step, logits in enumerate(ref.logits):
        top = torch.topk(logits[0].float(), 2).values
        if float(top[0] - top[1]) <= GAP:
            return
        assert int(got[0, start + step]) == int(ref.sequences[0, start + step]), f"step {step} differs"
