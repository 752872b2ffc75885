"""The device-agnostic decode path on the CPU: fetches staged through the host buffer (as on a GPU)
give the same slots and outputs as reads straight into the slots; a device out-of-memory for the
working set names the budget; a missing block still raises BlockMissingError when staged."""

from __future__ import annotations

import pytest
import torch

from kvtier.sparse import BlockMissingError, SparseKV
from kvtier.sparse.errors import WorkingSetMemoryError
from kvtier.sparse.staging import HostStaging

from .helpers import LAYOUT, config, dense_chunk_ref, make_store

L, H, D, BT = 2, 2, 8, 4


def decode(stage: bool, policy: str, margin: float, tmp_path, name: str) -> tuple[list[torch.Tensor], SparseKV]:
    store = make_store(memory_bytes=6 * 2 * L * H * BT * D * 4, disk_root=str(tmp_path / name))
    kv = SparseKV(store, config(policy, budget=24, window=8, keep_margin=margin), LAYOUT, salt=b"st",
                  stage_fetches=stage)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(L, H, 80, D, generator=g), torch.randn(L, H, 80, D, generator=g)
    for layer in range(L):
        kv.append(layer, k[layer, :, :50], v[layer, :, :50])
    kv.flush()
    outs = []
    for t in range(50, 80):
        for layer in range(L):
            kv.append(layer, k[layer, :, t : t + 1], v[layer, :, t : t + 1])
            outs.append(kv.attend(layer, torch.randn(2 * H, 1, D, generator=g), D**-0.5))
    return outs, kv


@pytest.mark.parametrize("policy,margin", [("quest", 0.0), ("hash", 0.0), ("quest_share", 1.0), ("oracle", 0.0)])
def test_staged_fetches_equal_direct_reads(policy: str, margin: float, tmp_path) -> None:
    direct, kv_d = decode(False, policy, margin, tmp_path, "d")
    staged, kv_s = decode(True, policy, margin, tmp_path, "s")
    assert kv_s.stage_fetches and not kv_d.stage_fetches
    for a, b in zip(direct, staged):
        assert torch.equal(a, b)
    for wd, ws in zip(kv_d.working, kv_s.working):
        assert torch.equal(wd.k, ws.k) and torch.equal(wd.v, ws.v)
    assert kv_s.fetched_bytes == kv_d.fetched_bytes > 0
    kv_d.store.close()
    kv_s.store.close()


def test_a_staged_fill_of_a_missing_block_raises_block_missing() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"m", stage_fetches=True)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(L, H, 64, D, generator=g), torch.randn(L, H, 64, D, generator=g)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    kv.flush()
    for key in kv.block_keys[1:-1]:
        assert store.memory is not None
        store.memory.delete(key)
    with pytest.raises(BlockMissingError, match="no tier"):
        kv.attend(0, torch.randn(4, 1, D), D**-0.5)
    # the slots that were to be filled hold nothing (never a block whose bytes did not arrive)
    ws = kv.working[0]
    held = ws.block_of[ws.block_of >= 0]
    assert all(int(b) == 0 or int(b) >= 14 for b in held.flatten())


def test_out_of_memory_for_the_working_set_names_the_budget(monkeypatch) -> None:
    """A CUDA OOM (mocked: the CPU allocation raises torch.OutOfMemoryError) is a clear error."""
    real = torch.zeros

    def oom(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], tuple) and len(args[0]) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", oom)
    with pytest.raises(WorkingSetMemoryError, match="sparse.budget_tokens 16") as err:
        SparseKV(make_store(), config("quest", budget=16), LAYOUT, salt=b"o")
    assert "lower the budget" in str(err.value)
    assert isinstance(err.value, MemoryError)


def test_host_staging_reuses_its_buffer_and_copies_to_the_device() -> None:
    st = HostStaging((2, 16), torch.device("cpu"))
    a = st.rows(3)
    a.fill_(7)
    b = st.rows(2)
    assert b.data_ptr() == a.data_ptr()  # reused, not reallocated
    out = st.to_device(b)
    assert out.device.type == "cpu" and torch.equal(out, torch.full((2, 2, 16), 7, dtype=torch.uint8))
    assert not st.pinned  # pinned only for CUDA
    assert st.rows(10).shape == (10, 2, 16)


@pytest.mark.parametrize("stream_tokens,score_bytes", [(8, None), (8, 600), (65536, None)])
def test_chunked_prefill_attention_gathered_or_streamed_is_exact(stream_tokens: int, score_bytes: int | None,
                                                                 monkeypatch) -> None:
    """attend_dense: one fused sdpa over the gathered context (default) or online softmax over pieces
    of `dense_stream_tokens` (8: a piece of 2 blocks, fewer than the 3 slots, so pieces of 3 blocks;
    score_bytes 600: a few query rows at a time, as a long chunk on a GPU) all equal causal sdpa over
    the whole context, GQA and a padding mask included."""

    from kvtier.sparse import kv as kv_module

    if score_bytes is not None:
        monkeypatch.setattr(kv_module, "_STREAM_SCORE_BYTES", score_bytes)

    store = make_store()
    kv = SparseKV(store, config("quest", budget=16, dense_stream_tokens=stream_tokens), LAYOUT, salt=b"p")
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(L, H, 45, D, generator=g), torch.randn(L, H, 45, D, generator=g)
    for span in (slice(0, 40), slice(40, 45)):
        for layer in range(L):
            kv.append(layer, k[layer, :, span], v[layer, :, span])
    q = torch.randn(2 * H, 5, D, generator=g)  # the last 5 positions, 2 query heads per KV head
    pad = torch.ones(5, 45, dtype=torch.bool)
    pad[:, :3] = False
    for layer in range(L):
        ref = dense_chunk_ref(q, k[layer], v[layer], 40, 45, D**-0.5, pad)
        assert torch.allclose(kv.attend_dense(layer, q, D**-0.5, pad), ref, atol=1e-5)
    store.close()


def test_chunked_prefill_reuses_the_gathered_blocks_and_stays_exact() -> None:
    """Three prefill chunks: each attend_dense after the first reads from the store only the blocks
    completed since the previous chunk (the rest is kept gathered), and every output is exact."""

    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"c")
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(L, H, 50, D, generator=g), torch.randn(L, H, 50, D, generator=g)
    bounds = [(0, 18), (18, 35), (35, 50)]
    for i, (lo, hi) in enumerate(bounds):
        for layer in range(L):
            kv.append(layer, k[layer, :, lo:hi], v[layer, :, lo:hi])
            if i == 0:
                continue
            before = kv.fetched_bytes
            q = torch.randn(2 * H, hi - lo, D, generator=g)
            ref = dense_chunk_ref(q, k[layer], v[layer], lo, hi, D**-0.5)
            assert torch.allclose(kv.attend_dense(layer, q, D**-0.5), ref, atol=1e-5)
            if i == 2:  # blocks 0..7 were gathered by chunk 2: at most the 4 new blocks 8..11 are read
                assert kv.fetched_bytes - before <= 4 * 2 * H * store.layer_bytes
    kv.attend(0, torch.randn(2 * H, 1, D), D**-0.5)
    assert 0 not in kv._gathered  # decode frees it
    store.close()


def test_the_context_prefill_gathered_is_released_when_decoding_starts() -> None:
    """Regression (H200 run: sparse_kv_gpu_bytes above dense's): a chunked prefill keeps the context
    gathered on the device for its next chunk; decode must hold only working sets and summaries."""
    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"r")
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(L, H, 60, D, generator=g), torch.randn(L, H, 60, D, generator=g)
    for lo, hi in ((0, 30), (30, 60)):
        for layer in range(L):
            kv.append(layer, k[layer, :, lo:hi], v[layer, :, lo:hi])
            if lo:
                kv.attend_dense(layer, torch.randn(2 * H, hi - lo, D, generator=g), D**-0.5)
    kv.flush()
    held = kv.device_bytes()
    assert held["prefill_gathered"] >= L * 2 * H * 60 * D * 4  # all 15 blocks of every layer, K and V
    kv.attend(0, torch.randn(2 * H, 1, D, generator=g), D**-0.5)  # the first decode step frees every layer's
    held = kv.device_bytes()
    assert held["prefill_gathered"] == 0 and held["span"] == 0
    assert held["working_sets"] == sum(ws.nbytes for ws in kv.working)
    assert sum(held.values()) == kv.fast_tier_bytes()
    kv.close()
    store.close()


def test_release_prefill_frees_the_gathered_context_and_a_later_chunk_stays_exact() -> None:

    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"p")
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(L, H, 40, D, generator=g), torch.randn(L, H, 40, D, generator=g)
    for lo, hi in ((0, 16), (16, 28), (28, 40)):
        for layer in range(L):
            kv.append(layer, k[layer, :, lo:hi], v[layer, :, lo:hi])
            if lo:
                q = torch.randn(2 * H, hi - lo, D, generator=g)
                ref = dense_chunk_ref(q, k[layer], v[layer], lo, hi, D**-0.5)
                assert torch.allclose(kv.attend_dense(layer, q, D**-0.5), ref, atol=1e-5)
        kv.release_prefill()
        assert kv.device_bytes()["prefill_gathered"] == 0
    kv.close()
    store.close()
