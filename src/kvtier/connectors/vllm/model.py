"""What the connector can serve, decided at start from vLLM's KV cache config.

Supported: plain decoder models with full attention in every layer, one KV cache group,
unquantized and unpadded pages, one tensor-parallel rank and one pipeline stage.
Refused with UnsupportedModelError (never silently wrong KV): hybrid models (Mamba/SSM,
linear attention, mixed groups), sliding-window or chunked-local attention, MLA, quantized
KV (fp8), padded pages, K/V head sizes that differ, tensor/pipeline parallelism.

`format_tag` names the byte format of a stored chunk; it goes into the key namespace so
KV written by one format is never read as another: vLLM's CPU backend stores opaque pages
whose interior depends on the kernel's ISA ("vllm-cpu-page:<isa>:<dtype>"); GPU adapters
write kvtier's canonical [kv_heads, K|V, tokens, head_size] ("canonical:<dtype>").
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvtier.core.errors import KVTierError
from kvtier.core.layout import DTYPE_SIZES, KVLayout


class UnsupportedModelError(KVTierError):
    """The model, its KV cache or the parallel setup is one the connector does not map."""


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def check_spec(spec: Any) -> None:
    """Refuse every KV cache spec but unquantized, unpadded full attention."""
    names = _class_names(spec)
    if names & {"MambaSpec"} or "AttentionSpec" not in names:
        raise UnsupportedModelError(
            f"kvtier's vLLM connector supports plain full-attention models only; this model has a "
            f"{type(spec).__name__} KV cache (hybrid / SSM / linear attention), which is not supported yet")
    if any("MLA" in n for n in names):
        raise UnsupportedModelError(
            "kvtier's vLLM connector does not support MLA models (multi-head latent attention, e.g. DeepSeek) yet")
    window = getattr(spec, "sliding_window", None)
    if names & {"SlidingWindowSpec", "ChunkedLocalAttentionSpec", "CircularBufferSpec", "RSWASpec"} or window:
        raise UnsupportedModelError(
            "kvtier's vLLM connector does not support sliding-window or chunked-local attention models yet "
            f"(KV cache spec {type(spec).__name__}, sliding_window={window})")
    if getattr(spec, "attention_chunk_size", None):
        raise UnsupportedModelError("kvtier's vLLM connector does not support chunked-local attention yet")
    if names & {"EncoderOnlyAttentionSpec", "CrossAttentionSpec", "SinkFullAttentionSpec"}:
        raise UnsupportedModelError(f"kvtier's vLLM connector does not support {type(spec).__name__} layers")
    quant = getattr(spec, "kv_quant_mode", None)
    if quant is not None and int(quant) != 0:
        raise UnsupportedModelError(f"kvtier's vLLM connector does not support quantized KV caches ({quant!r}); "
                                    "use kv_cache_dtype='auto'")
    if getattr(spec, "page_size_padded", None) is not None:
        raise UnsupportedModelError("kvtier's vLLM connector does not support padded KV pages (page_size_padded)")
    hv = getattr(spec, "head_size_v", None)
    if hv is not None and hv != spec.head_size:
        raise UnsupportedModelError(f"K head size {spec.head_size} != V head size {hv} is not supported")
    if torch_dtype_name(spec.dtype) not in DTYPE_SIZES or torch_dtype_name(spec.dtype).startswith(("float8", "int", "uint")):
        raise UnsupportedModelError(f"KV cache dtype {spec.dtype} is not supported (float32, float16, bfloat16 are)")


def torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(slots=True, frozen=True)
class ModelKV:
    """The KV cache the connector serves: layer names in layer order and the kvtier layout."""

    layer_names: tuple[str, ...]
    layout: KVLayout
    block_size: int


def model_kv(kv_cache_groups: Sequence[Any], tp_size: int = 1, pp_size: int = 1, cache_dtype: str = "auto",
             use_mla: bool = False, is_hybrid: bool = False) -> ModelKV:
    """Check the KV cache groups (vLLM's KVCacheConfig.kv_cache_groups) and derive the layout."""
    if use_mla:
        raise UnsupportedModelError(
            "kvtier's vLLM connector does not support MLA models (multi-head latent attention, e.g. DeepSeek) yet")
    if is_hybrid:
        raise UnsupportedModelError(
            "kvtier's vLLM connector supports plain full-attention models only; hybrid models "
            "(Mamba/SSM or linear attention layers) are not supported yet")
    if tp_size != 1 or pp_size != 1:
        raise UnsupportedModelError(
            f"kvtier's vLLM connector supports one rank only for now (tensor_parallel_size={tp_size}, "
            f"pipeline_parallel_size={pp_size}): per-rank KV would need per-rank keys")
    if cache_dtype not in ("auto", None, ""):
        raise UnsupportedModelError(
            f"kvtier's vLLM connector does not support quantized KV caches (kv_cache_dtype={cache_dtype!r}); "
            "use kv_cache_dtype='auto'")
    if len(kv_cache_groups) != 1:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in kv_cache_groups})
        raise UnsupportedModelError(
            f"kvtier's vLLM connector supports models with one KV cache group (plain full attention); this model "
            f"has {len(kv_cache_groups)} groups ({', '.join(kinds)}): hybrid or sliding-window models are not "
            "supported yet")
    group = kv_cache_groups[0]
    spec = group.kv_cache_spec
    inner = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs
    for s in inner.values() if isinstance(inner, dict) else [spec]:
        check_spec(s)
    if isinstance(inner, dict):
        spec = next(iter(inner.values()))
    layout = KVLayout(num_layers=len(group.layer_names), num_kv_heads=int(spec.num_kv_heads),
                      head_size=int(spec.head_size), dtype=torch_dtype_name(spec.dtype))
    return ModelKV(tuple(group.layer_names), layout, int(spec.block_size))


def predict_cpu_isa(dtype: str, block_size: int, head_size: int, amx: bool, machine: str | None = None) -> str:
    """The CPU attention kernel's in-page format family, as vLLM 0.32's cpu_attn chooses it."""
    machine = (machine or platform.machine()).lower()
    if head_size % 32 != 0 and head_size % 16 == 0:
        return "vec16"
    if amx and dtype == "bfloat16" and block_size % 32 == 0:
        return "amx"
    if machine in ("aarch64", "arm64"):
        return "neon"
    if block_size % 32 != 0:
        return "vec16"
    if machine in ("x86_64", "amd64", "i686"):
        return "vec"
    return f"other-{machine}"


def cpu_amx_supported() -> bool:
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - older torch: no AMX detection, assume none
        return False


def format_tag(is_cpu: bool, layout: KVLayout, block_size: int, amx: bool = False) -> str:
    if is_cpu:
        return f"vllm-cpu-page:{predict_cpu_isa(layout.dtype, block_size, layout.head_size, amx)}:{layout.dtype}"
    return f"canonical:{layout.dtype}"
