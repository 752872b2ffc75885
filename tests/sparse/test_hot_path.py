"""Issue 22 on the CPU: one batched store read per layer at decode; prefill's writes on a background writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kvtier.sparse import SparseKV
from kvtier.sparse.errors import SparseWriteError

from .helpers import LAYOUT, config, dense_chunk_ref, make_store

L, H, D, BT = 2, 2, 8, 4


def random_kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, t, D, generator=g), torch.randn(L, H, t, D, generator=g)


@pytest.mark.parametrize("stage", [False, True])
def test_each_layer_reads_its_new_slices_in_one_store_call(stage: bool) -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"one", stage_fetches=stage)
    k, v = random_kv(256)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    calls: list[int] = []
    real_each = store.load_here_each
    store.load_here_each = lambda keys, dests, sections: (calls.append(len(keys)), real_each(keys, dests, sections))[1]
    real_gather = store.gather_here  # staged fills read all their slices with one gather
    store.gather_here = lambda keys, secs, span, out: (calls.append(len(keys)), real_gather(keys, secs, span, out))[1]
    store.load_here = lambda *a, **kw: pytest.fail("decode read the store per head")  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for layer in range(L):
            before = kv.working[layer].fetched_slices
            n_calls = len(calls)
            kv.attend(layer, torch.randn(2 * H, 1, D, generator=g), D**-0.5)
            new = kv.working[layer].fetched_slices - before
            # the slices of every head that wanted any, in one call; none when nothing changed
            assert calls[n_calls:] == ([new] if new else [])
    assert sum(calls) > 0
    store.close()


def _gate_writes(kv: SparseKV) -> threading.Event:
    """Hold the background writer's jobs until someone drains it (so writes are surely pending)."""
    gate = threading.Event()
    real_begin = kv.store.begin_save
    kv.store.begin_save = lambda *a: (gate.wait(30), real_begin(*a))[1]  # type: ignore[method-assign]
    assert kv._writer is not None
    real_drain = kv._writer.drain

    def drain() -> None:
        gate.set()
        real_drain()

    kv._writer.drain = drain  # type: ignore[method-assign]
    return gate


def test_a_read_right_after_prefill_returns_the_blocks_still_being_written() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=512), LAYOUT, salt=b"aw")  # budget > context: dense
    gate = _gate_writes(kv)
    k, v = random_kv(64)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    assert kv._writer is not None and kv._writer.pending == L and not gate.is_set()  # nothing written yet
    q = torch.randn(2 * H, 1, D)
    out = kv.attend(0, q, D**-0.5)  # reads blocks 1.. from the store: waits for the writer
    assert gate.is_set() and kv._writer.pending == 0
    ref = torch.nn.functional.scaled_dot_product_attention(q.reshape(H, 2, D), k[0], v[0], scale=D**-0.5)
    torch.testing.assert_close(out, ref.reshape(2 * H, 1, D))
    assert store.lookup(kv.block_keys).hits == len(kv.block_keys) == 64 // BT
    kv.close()
    store.close()


def test_close_writes_everything_queued() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"cl")
    gate = _gate_writes(kv)
    k, v = random_kv(96)
    for lo in range(0, 96, 48):  # two prefill chunks queued behind the gate (the queue holds 2 x L jobs)
        for layer in range(L):
            kv.append(layer, k[layer, :, lo : lo + 48], v[layer, :, lo : lo + 48])
    assert store.lookup(kv.block_keys).hits == 0
    kv.close()
    assert gate.is_set() and store.lookup(kv.block_keys).hits == 96 // BT
    got = [np.zeros(store.layer_bytes, np.uint8)]
    assert not store.load_here([kv.block_keys[-1]], [got], [kv._section(1, 1, 1)]).failed
    assert torch.equal(torch.from_numpy(got[0]).view(torch.float32).view(BT, D), v[1, 1, 92:96])
    store.close()


def test_a_failed_background_write_is_reported() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"wf")

    def broken(*a):
        raise OSError("disk on fire")

    store.begin_save = broken  # type: ignore[method-assign]
    k, v = random_kv(32)
    try:
        for layer in range(L):
            kv.append(layer, k[layer], v[layer])  # queued: the failure comes later (or at the next submit)
    except SparseWriteError as e:
        assert "disk on fire" in str(e)
    with pytest.raises(SparseWriteError, match="disk on fire"):
        kv.flush()
    with pytest.raises(SparseWriteError):  # and again: never forgotten
        kv.attend(0, torch.randn(2 * H, 1, D), D**-0.5)
    with pytest.raises(SparseWriteError):
        kv.append(0, k[0, :, :BT], v[0, :, :BT])
    with pytest.raises(SparseWriteError):
        kv.close()
    store.close()


def test_synchronous_writes_raise_at_once() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"ws", async_writes=False)

    def broken(*a):
        raise OSError("disk on fire")

    store.begin_save = broken  # type: ignore[method-assign]
    k, v = random_kv(32)
    with pytest.raises(OSError, match="disk on fire"):
        kv.append(0, k[0], v[0])
    store.close()


def _decode(prefetch: int, guess=None, steps: int = 12) -> tuple[torch.Tensor, SparseKV]:
    """Attention outputs of a drifting decode over 2 layers (budget 1/8), with `prefetch` runners-up
    read ahead; `guess` replaces the prefetcher's guesses (heads, blocks) -> (heads, blocks)."""
    store = make_store(memory_bytes=1 << 24)
    kv = SparseKV(store, config("quest", budget=64, window=8, prefetch_blocks=prefetch), LAYOUT, salt=b"pf")
    if guess is not None:
        assert kv._prefetch is not None
        real_start = kv._prefetch.start
        kv._prefetch.start = lambda layer, h, b, *a: real_start(layer, *guess(h, b), *a)  # type: ignore[method-assign]
    k, v = random_kv(512, seed=5)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    g = torch.Generator().manual_seed(9)
    q = torch.randn(L, 2 * H, 1, D, generator=g)
    outs = []
    for _ in range(steps):
        q = 0.95 * q + 0.3 * torch.randn(L, 2 * H, 1, D, generator=g)
        for layer in range(L):
            outs.append(kv.attend(layer, q[layer], D**-0.5))
    kv.close()
    store.close()
    return torch.stack(outs), kv


def test_prefetched_slices_are_used_and_change_nothing() -> None:
    plain, kv0 = _decode(0)
    out, kv = _decode(4)
    assert torch.equal(out, plain)
    assert kv._prefetch is not None and kv._prefetch.used_slices > 0
    assert 0 < kv._prefetch.used_slices <= kv._prefetch.prefetched_slices
    # what was filled from the prefetch was not read again at the step
    assert sum(ws.fetched_slices for ws in kv.working) == sum(ws.fetched_slices for ws in kv0.working)


@pytest.mark.parametrize("wrong", ["other_blocks", "other_heads", "missing_block"])
def test_a_wrong_prefetch_never_changes_the_output(wrong: str) -> None:
    plain, _ = _decode(0)
    rng = np.random.default_rng(0)

    def guess(heads: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if wrong == "other_blocks":
            return heads, rng.integers(0, 512 // BT, len(blocks))
        if wrong == "other_heads":
            return (heads + 1) % H, blocks
        return heads, np.full(len(blocks), 10_000)  # in no tier: the read ahead fails and is dropped

    out, kv = _decode(4, guess)
    assert torch.equal(out, plain)
    assert kv._prefetch is not None and kv._prefetch.prefetched_slices > 0 or wrong == "missing_block"


def test_a_chunked_prefill_reads_nothing_back_and_never_waits_for_the_writer() -> None:
    """Regression (H200: prefill through the sparse cache 5.45x dense at 32k): the second chunk's
    attention re-read the first chunk from the store, after waiting for its background writes. The
    prefill's completed blocks stay gathered on the device instead; outputs are unchanged."""

    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"g")
    k, v = random_kv(40, seed=4)
    assert kv._writer is not None
    kv._writer.drain = lambda: pytest.fail("prefill waited for the background writer")  # type: ignore[method-assign]
    store.load_here = lambda *a, **kw: pytest.fail("prefill read the context back")  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    for lo, hi in ((0, 17), (17, 30), (30, 40)):
        for layer in range(L):
            kv.append(layer, k[layer, :, lo:hi], v[layer, :, lo:hi])
            if lo:
                q = torch.randn(2 * H, hi - lo, D, generator=g)
                ref = dense_chunk_ref(q, k[layer], v[layer], lo, hi, D**-0.5)
                assert torch.allclose(kv.attend_dense(layer, q, D**-0.5), ref, atol=1e-5)
    assert kv.fetched_bytes == 0
    del kv._writer.drain
    kv.close()
    store.close()
