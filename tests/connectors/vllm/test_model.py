"""What the connector refuses at start: hybrid/SSM, sliding-window, MLA, quantized, padded, TP."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvtier.connectors.vllm.model import UnsupportedModelError, format_tag, model_kv, predict_cpu_isa
from kvtier.core.layout import KVLayout

kvi = pytest.importorskip("vllm.v1.kv_cache_interface", reason="vllm is not installed")


@dataclass
class Group:  # the fields of vllm's KVCacheGroupSpec the connector reads
    layer_names: list[str]
    kv_cache_spec: object


LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def full(**kw: object) -> object:
    return kvi.FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32, **kw)


def test_plain_full_attention_is_accepted() -> None:
    m = model_kv([Group(LAYERS, full())])
    assert m.layout == KVLayout(num_layers=2, num_kv_heads=2, head_size=32, dtype="float32")
    assert m.layer_names == tuple(LAYERS) and m.block_size == 32


def test_sliding_window_is_refused() -> None:
    spec = kvi.SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        model_kv([Group(LAYERS, spec)])
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        model_kv([Group(LAYERS, full(sliding_window=64))])


def test_interleaved_sliding_window_groups_are_refused() -> None:
    swa = kvi.SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=128)
    with pytest.raises(UnsupportedModelError, match="2 groups"):
        model_kv([Group(LAYERS[:1], full()), Group(LAYERS[1:], swa)])


def test_mla_is_refused() -> None:
    spec = kvi.MLAAttentionSpec(block_size=32, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match="MLA"):
        model_kv([Group(LAYERS, spec)])
    with pytest.raises(UnsupportedModelError, match="MLA"):
        model_kv([Group(LAYERS, full())], use_mla=True)


def test_hybrid_ssm_is_refused() -> None:
    mamba = kvi.MambaSpec(block_size=32, shapes=((4, 8),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        model_kv([Group(LAYERS, mamba)])
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        model_kv([Group(LAYERS[:1], full()), Group(LAYERS[1:], mamba)])
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        model_kv([Group(LAYERS, full())], is_hybrid=True)


def test_quantized_kv_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="quantized"):
        model_kv([Group(LAYERS, full())], cache_dtype="fp8")


def test_padded_pages_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="padded"):
        model_kv([Group(LAYERS, full(page_size_padded=1 << 16))])


def test_tensor_parallel_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="tensor_parallel_size=2"):
        model_kv([Group(LAYERS, full())], tp_size=2)


def test_format_tag_separates_cpu_isas_and_canonical() -> None:
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_size=32, dtype="bfloat16")
    assert format_tag(False, lay, 32) == "canonical:bfloat16"
    assert predict_cpu_isa("bfloat16", 32, 32, amx=True, machine="x86_64") == "amx"
    assert predict_cpu_isa("float32", 32, 32, amx=True, machine="x86_64") == "vec"
    assert predict_cpu_isa("float32", 32, 32, amx=False, machine="aarch64") == "neon"
    assert predict_cpu_isa("float32", 32, 48, amx=False, machine="x86_64") == "vec16"
    assert format_tag(True, lay, 32, amx=True) != format_tag(True, lay, 32, amx=False)
