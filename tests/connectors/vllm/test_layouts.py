"""Layout adapters against synthetic KV views built the way vLLM 0.32 builds them
(one flat int8 buffer, logical [L, B, H, N, C] with strides from a KVCacheLayout permutation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.connectors.vllm.layouts import (
    CpuPageAdapter,
    SplitLastAdapter,
    UnsupportedLayoutError,
    make_adapter,
)
from kvtier.core.layout import KVLayout

LBHNC = (0, 1, 2, 3, 4)  # CPU_ATTN (and FlashInfer HND)
LBNHC = (0, 1, 3, 2, 4)  # FlashAttention's default ("NHD")
BLNHC = (1, 0, 3, 2, 4)


def vllm_views(num_layers: int, num_blocks: int, heads: int, tokens: int, content: int, dtype: torch.dtype,
               order: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-layer logical [B, H, N, C] views of one flat int8 buffer, like create_kv_cache_views."""
    esize = torch.empty((), dtype=dtype).element_size()
    shape = (num_layers, num_blocks, heads, tokens, content * esize)  # C in bytes
    strides = [0] * 5
    cur = 1
    for dim in reversed(order):
        strides[dim] = cur
        cur *= shape[dim]
    raw = torch.zeros(cur, dtype=torch.int8)
    view5 = torch.as_strided(raw, shape, strides)
    return [view5[i].view(dtype) for i in range(num_layers)]


def layout(dtype: str = "float32", heads: int = 2, head: int = 8) -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=heads, head_size=head, dtype=dtype)


def fill_random(kv: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_page_adapter_moves_whole_pages(dtype: torch.dtype) -> None:
    lay = layout(str(dtype).removeprefix("torch."))
    src, dst = (vllm_views(2, 6, 2, 32, 16, dtype, LBHNC)[0] for _ in range(2))
    fill_random(src, 1)
    a, b = CpuPageAdapter(src, lay, 6, 32), CpuPageAdapter(dst, lay, 6, 32)
    section = a.save_source(3)
    assert section.dtype == np.uint8 and section.nbytes == lay.layer_bytes(32)
    assert np.shares_memory(section, src.view(torch.int8).numpy())  # zero-copy view of vLLM's page
    target, finish = b.load_target(5)
    assert finish is None
    target[:] = section
    assert torch.equal(dst[5], src[3]) and not dst[:5].any() and not dst[4].any()


def test_cpu_page_adapter_refuses_non_contiguous_pages() -> None:
    kv = vllm_views(2, 4, 2, 32, 16, torch.float32, LBNHC)[0]
    with pytest.raises(UnsupportedLayoutError, match="not contiguous"):
        CpuPageAdapter(kv, layout(), 4, 32)


@pytest.mark.parametrize("order", [LBNHC, LBHNC, BLNHC])
def test_split_last_adapter_gives_canonical_sections(order: tuple[int, ...]) -> None:
    lay = layout()
    d = lay.head_size
    kv = vllm_views(2, 5, 2, 16, 2 * d, torch.float32, order)[1]
    fill_random(kv, 2)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)  # what FlashAttention reads: [B, N, H, D]
    a = SplitLastAdapter(kv, lay, 5, 16)
    section = torch.from_numpy(a.save_source(2).copy()).view(torch.float32).view(2, 2, 16, d)  # [H, K|V, N, D]
    assert torch.equal(section[:, 0], key_cache[2].transpose(0, 1))
    assert torch.equal(section[:, 1], value_cache[2].transpose(0, 1))
    other = vllm_views(2, 5, 2, 16, 2 * d, torch.float32, order)[1]
    b = SplitLastAdapter(other, lay, 5, 16)
    target, finish = b.load_target(4)
    target[:] = a.save_source(2)
    assert finish is not None
    finish()
    assert torch.equal(other[4], kv[2]) and not other[:4].any()


def test_split_last_adapter_gathers_kernel_blocks() -> None:
    lay = layout()
    d = lay.head_size
    kv = vllm_views(2, 8, 2, 16, 2 * d, torch.float32, LBNHC)[0]  # 4 vLLM blocks of 32 = 8 kernel blocks of 16
    fill_random(kv, 3)
    a = SplitLastAdapter(kv, lay, 4, 32)
    section = torch.from_numpy(a.save_source(1).copy()).view(torch.float32).view(2, 2, 32, d)
    k, _v = kv.transpose(1, 2).split(d, dim=-1)
    tokens = torch.cat([k[2], k[3]])  # kernel blocks 2, 3 = tokens 0..31 of vLLM block 1
    assert torch.equal(section[:, 0], tokens.transpose(0, 1))


@pytest.mark.parametrize("adapter", ["cpu", "split_last"])
def test_clear_tokens_zeroes_exactly_the_tokens_after_a_partial_chunk(adapter: str) -> None:
    lay = layout()
    d, n, valid = lay.head_size, 16, 5
    if adapter == "cpu":
        kv = vllm_views(2, 4, 2, n, 2 * d, torch.float32, LBHNC)[0]
        a: CpuPageAdapter | SplitLastAdapter = CpuPageAdapter(kv, lay, 4, n)
    else:
        kv = vllm_views(2, 4, 2, n, 2 * d, torch.float32, LBNHC)[1]
        a = SplitLastAdapter(kv, lay, 4, n)
    fill_random(kv, 4)
    section = a.save_source(1).copy()
    a.clear_tokens(section, valid)
    other = torch.zeros_like(kv)
    b = type(a)(other, lay, 4, n)
    target, finish = b.load_target(2)
    target[:] = section
    if finish is not None:
        finish()
    # vLLM's own view of the block: [H, N, K|V] for both (CPU: the kernel's view differs, the bytes do not)
    got = other[2] if adapter == "split_last" else other[2].view(-1)
    if adapter == "cpu":  # per head: K^T [D, N], then V [N, D]
        src = kv[1].reshape(2, 2, -1)
        got = got.view(2, 2, -1)
        k_want = src[:, 0].reshape(2, d, n).clone()
        k_want[:, :, valid:] = 0
        v_want = src[:, 1].reshape(2, n, d).clone()
        v_want[:, valid:] = 0
        assert torch.equal(got[:, 0].reshape(2, d, n), k_want) and torch.equal(got[:, 1].reshape(2, n, d), v_want)
    else:
        want = kv[1].clone()
        want[:, valid:] = 0  # [H, N, 2D]: tokens from `valid` on
        assert torch.equal(got, want)
        assert got[:, :valid].abs().sum() > 0


def test_unknown_backend_is_refused() -> None:
    kv = vllm_views(2, 4, 2, 32, 16, torch.float32, LBHNC)[0]
    with pytest.raises(UnsupportedLayoutError, match="no layout adapter for the 'FLASHINFER'"):
        make_adapter("FLASHINFER", kv, layout(), 4, 32)


def test_dtype_mismatch_is_refused() -> None:
    kv = vllm_views(2, 4, 2, 32, 16, torch.float16, LBHNC)[0]
    with pytest.raises(UnsupportedLayoutError, match="dtype"):
        make_adapter("CPU_ATTN", kv, layout("float32"), 4, 32)


def test_padded_head_content_is_refused() -> None:
    kv = vllm_views(2, 4, 2, 32, 24, torch.float32, LBNHC)[0]  # C = 24 != 2 * head_size
    with pytest.raises(UnsupportedLayoutError, match="padded"):
        make_adapter("FLASH_ATTN", kv, layout(), 4, 32)


def test_quantized_kv_view_is_refused() -> None:
    kv = vllm_views(2, 4, 2, 32, 16, torch.uint8, LBHNC)[0]  # an fp8 cache is allocated as bytes
    with pytest.raises(UnsupportedLayoutError, match="dtype"):
        make_adapter("CPU_ATTN", kv, layout("float32"), 4, 32)


def test_matches_vllm_create_kv_cache_views_when_installed() -> None:
    kvi = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = kvi.FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
    page = spec.page_size_bytes
    tensor = kvi.KVCacheTensor(size=2 * 4 * page, layers=["a", "b"], layer_stride=4 * page, block_stride=page)
    raw = torch.zeros(tensor.size, dtype=torch.int8)
    views = kvi.create_kv_cache_views(raw, spec, 4, KVCacheLayout.LBHNC, tensor)
    ours = vllm_views(2, 4, 2, 16, 16, torch.float32, LBHNC)
    assert [tuple(v.shape) for v in views] == [tuple(v.shape) for v in ours]
    assert [v.stride() for v in views] == [v.stride() for v in ours]
    CpuPageAdapter(views[1], layout(), 4, 16)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_clear_tokens_matches_vllms_own_cpu_kernel_for_a_partial_chunk(isa: str) -> None:
    """A partial chunk is saved from a block the forward filled past the prompt; cleared, it must
    equal the block vLLM's kernel writes for the prompt's tokens alone. Checked with vLLM's real
    reshape_and_cache op for the ISAs kvtier saves partial chunks on (the AMX kernel packs K in
    VNNI groups: the connector turns partial chunks off there)."""
    vllm_ops = pytest.importorskip("vllm._custom_ops", reason="vllm is not installed")
    h, d, n, valid = 2, 32, 32, 5
    torch.manual_seed(0)
    key = torch.randn(n, h, d, dtype=torch.bfloat16) + 3
    val = torch.randn(n, h, d, dtype=torch.bfloat16) + 3

    def section_after(tokens: int) -> tuple[np.ndarray, CpuPageAdapter]:
        kv = torch.full((2, h, n, 2 * d), 7.0, dtype=torch.bfloat16)  # block 1: what an earlier request left
        if tokens < n:
            kv[1].zero_()
        k_cache, v_cache = kv.view(2, h, 2 * n, d).chunk(2, dim=2)  # as CPUAttentionBackendImpl.forward
        vllm_ops.cpu_attn_reshape_and_cache(key[:tokens], val[:tokens], k_cache, v_cache,
                                            torch.arange(n, n + tokens), isa)
        lay = KVLayout(num_layers=1, num_kv_heads=h, head_size=d, dtype="bfloat16")
        adapter = CpuPageAdapter(kv, lay, 2, n, n)
        return adapter.save_source(1).copy(), adapter

    want, _ = section_after(valid)
    got, adapter = section_after(n)
    adapter.clear_tokens(got, valid)
    assert np.array_equal(got, want)
