"""SparseKV: dense equivalence, the always-kept blocks, the byte budget, faults and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvtier.core.layout import KVLayout
from kvtier.sparse import BlockMissingError, SparseConfig, SparseConfigError, SparseKV, WorkingSet
from kvtier.sparse.working_set import EMPTY

from .helpers import LAYOUT, config, fill, make_store

L, H, D, BT = 2, 2, 8, 4


def dense_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Hq, 1, d] against k, v [H, T, d] with GQA."""
    g = q.shape[0] // k.shape[0]
    out = F.scaled_dot_product_attention(q.reshape(k.shape[0], g, D), k, v, scale=D**-0.5)
    return out.reshape(q.shape)


def random_kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, t, D, generator=g), torch.randn(L, H, t, D, generator=g)


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("policy", ["dense", "quest", "streaming", "mean", "hash", "oracle", "quest_mean", "quest_share"])
def test_budget_larger_than_context_is_dense(policy: str, stage: bool) -> None:
    """Also with fetches staged through the host buffer, as on a GPU."""
    store = make_store()
    kv = SparseKV(store, config(policy, budget=64), LAYOUT, salt=policy.encode(), stage_fetches=stage)
    k, v = random_kv(37)
    fill(kv, k, v, 21)
    q = torch.randn(4, 1, D, generator=torch.Generator().manual_seed(5))
    for layer in range(L):
        assert torch.allclose(kv.attend(layer, q, D**-0.5), dense_ref(q, k[layer], v[layer]), atol=1e-6)
        assert torch.allclose(kv.attend_dense(layer, q, D**-0.5), dense_ref(q, k[layer], v[layer]), atol=1e-6)


def test_dense_policy_attends_everything_past_the_budget() -> None:
    store = make_store()
    kv = SparseKV(store, config("dense", budget=12), LAYOUT, salt=b"d")
    k, v = random_kv(61)
    fill(kv, k, v, 30)
    q = torch.randn(4, 1, D)
    assert torch.allclose(kv.attend(1, q, D**-0.5), dense_ref(q, k[1], v[1]), atol=1e-6)


def test_sparse_attention_is_exact_over_what_it_selected() -> None:
    """With one retrieval slot, the output equals dense attention restricted to sinks + window + pick + tail."""
    store = make_store()
    kv = SparseKV(store, config("oracle", budget=16), LAYOUT, salt=b"s")  # 3 slots: sink, window, 1 pick; + tail
    k, v = random_kv(30)
    fill(kv, k, v, 30)
    q = torch.randn(2, 1, D)  # one query head per KV head
    out = kv.attend(0, q, D**-0.5)
    ws = kv.working[0]
    for h in range(H):
        blocks = sorted(ws.block_of[h].tolist())
        assert blocks[0] == 0 and blocks[-1] == 6  # sink and window (7 full blocks, tail of 2)
        idx = torch.cat([torch.arange(b * BT, b * BT + BT) for b in blocks] + [torch.arange(28, 30)])
        ref = F.scaled_dot_product_attention(q[h : h + 1], k[0, h, idx].unsqueeze(0), v[0, h, idx].unsqueeze(0),
                                             scale=D**-0.5)
        assert torch.allclose(out[h], ref[0], atol=1e-6)


@pytest.mark.parametrize("policy", ["quest", "streaming", "mean", "hash", "oracle", "quest_mean", "quest_share"])
def test_sinks_window_present_and_bytes_within_budget(policy: str) -> None:
    cfg = config(policy, budget=24, sinks=4, window=8)  # 5 slots: 1 sink, 2 window, 2 picks; + tail
    store = make_store()
    kv = SparseKV(store, cfg, LAYOUT, salt=policy.encode())
    k, v = random_kv(70)
    for layer in range(L):
        kv.append(layer, k[layer, :, :40], v[layer, :, :40])
    g = torch.Generator().manual_seed(3)
    kv_bytes_per_token = L * H * 2 * D * 4
    for t in range(40, 70):
        for layer in range(L):
            kv.append(layer, k[layer, :, t : t + 1], v[layer, :, t : t + 1])
            kv.attend(layer, torch.randn(4, 1, D, generator=g), D**-0.5)
            ws = kv.working[layer]
            nb = (t + 1) // BT
            for h in range(H):
                held = set(ws.block_of[h].tolist())
                assert 0 in held, "sink block missing"
                assert {nb - 1, nb - 2} <= held, "window block missing"
        ws_bytes = sum(w.nbytes for w in kv.working)
        assert ws_bytes <= cfg.budget_tokens * kv_bytes_per_token
        assert kv.fast_tier_bytes() == ws_bytes + kv.summary_bytes()
        assert kv.fast_tier_bytes() <= kv.budget_bytes() + kv.summary_bytes()


def test_only_changed_blocks_are_fetched() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"f")
    k, v = random_kv(64)
    fill(kv, k, v, 64)
    q = torch.randn(4, 1, D)
    kv.attend(0, q, D**-0.5)
    before = kv.fetched_bytes
    kv.attend(0, q, D**-0.5)  # same query, same context: nothing changes
    assert kv.fetched_bytes == before


def test_retrieval_stride_reuses_the_picks() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24, retrieval_stride=4), LAYOUT, salt=b"r")
    k, v = random_kv(64)
    fill(kv, k, v, 64)
    g = torch.Generator().manual_seed(0)
    kv.attend(0, torch.randn(4, 1, D, generator=g), D**-0.5)
    picks = kv._picks[0].clone()
    kv.attend(0, torch.randn(4, 1, D, generator=g), D**-0.5)
    assert torch.equal(kv._picks[0], picks)


def recording_fill(ws: WorkingSet, calls: list[list[tuple[int, int]]]):
    """A `fill` that writes block id b into K (and -b into V) and records the (head, block) pairs."""
    def fill(heads: np.ndarray, blocks: np.ndarray, slots: np.ndarray) -> None:
        calls.append(list(zip(heads.tolist(), blocks.tolist())))
        value = torch.from_numpy(blocks).float().view(-1, 1, 1)
        ws.k[torch.from_numpy(heads), torch.from_numpy(slots)] = value
        ws.v[torch.from_numpy(heads), torch.from_numpy(slots)] = -value
    return fill


def test_working_set_ensure_fills_free_slots_per_head() -> None:
    ws = WorkingSet(kv_heads=2, slots=3, block_tokens=1, head_size=1)
    calls: list[list[tuple[int, int]]] = []
    fill = recording_fill(ws, calls)
    assert ws.ensure(torch.tensor([[1, 2, 3], [1, 4, EMPTY]]), fill) == 5
    assert calls == [[(0, 1), (0, 2), (0, 3), (1, 1), (1, 4)]]  # per head: block 1 twice, once for each
    assert ws.ensure(torch.tensor([[3, 5, 1], [4, 1, 6]]), fill) == 2
    assert calls[-1] == [(0, 5), (1, 6)]
    assert (ws.fetched_slices, ws.fetched_blocks) == (7, 6)
    assert sorted(ws.block_of[0].tolist()) == [1, 3, 5]
    assert sorted(ws.block_of[1].tolist()) == [1, 4, 6]
    for h in range(2):
        for s in range(3):
            assert ws.k[h, s].item() == ws.block_of[h, s].item() == -ws.v[h, s].item()


def test_working_set_fill_failure_leaves_the_slots_empty() -> None:
    """A fill that raises (a block missing or corrupt in the store) must not leave its slots
    marked as holding blocks whose bytes never arrived."""
    ws = WorkingSet(kv_heads=2, slots=3, block_tokens=1, head_size=1)
    ws.ensure(torch.tensor([[1, 2, 3], [1, 2, 3]]), recording_fill(ws, []))

    def broken(heads: np.ndarray, blocks: np.ndarray, slots: np.ndarray) -> None:
        ws.k[torch.from_numpy(heads), torch.from_numpy(slots)] = float("nan")  # half-written garbage
        raise BlockMissingError("gone")

    with pytest.raises(BlockMissingError):
        ws.ensure(torch.tensor([[1, 2, 7], [1, 2, 3]]), broken)
    assert ws.block_of[0].tolist().count(EMPTY) == 1 and 7 not in ws.block_of[0].tolist()
    assert ws.ensure(torch.tensor([[1, 2, 7], [1, 2, 3]]), recording_fill(ws, [])) == 1
    assert not torch.isnan(ws.k).any()


def test_working_set_slot_map_follows_random_ensures_and_inserts() -> None:
    """The block -> slot map behind `ensure` agrees with the slots after any mix of ensures (with
    padding, block ids past the map's size) and inserts: each wanted block held exactly once, its
    data in its slot, nothing fetched that was held."""
    rng = torch.Generator().manual_seed(3)
    h, slots = 3, 6
    ws = WorkingSet(kv_heads=h, slots=slots, block_tokens=1, head_size=1)
    fetched: list[list[tuple[int, int]]] = []
    fill = recording_fill(ws, fetched)

    for step in range(200):
        n_blocks = 8 if step < 100 else 300  # grows the map mid-way
        if step % 7 == 3:
            block = int(torch.randint(n_blocks, (1,), generator=rng))
            ws.insert(block, torch.full((h, 1, 1), float(block)), torch.full((h, 1, 1), -float(block)),
                      lambda bo: bo == -2)  # nothing protected
            continue
        m = int(torch.randint(1, slots + 1, (1,), generator=rng))
        wanted = torch.stack([torch.randperm(n_blocks, generator=rng)[:m] for _ in range(h)])
        wanted[:, m - 1 :][torch.rand(h, 1, generator=rng) < 0.3] = EMPTY
        before = ws.block_of.clone()
        fetched.clear()
        ws.ensure(wanted, fill)
        mask = ws.token_mask()
        missing: set[tuple[int, int]] = set()
        for r in range(h):
            want = {b for b in wanted[r].tolist() if b != EMPTY}
            held = ws.block_of[r].tolist()
            assert want <= set(held) and len([b for b in held if b in want]) == len(want)
            assert {held[s] for s in range(slots) if mask[r, s]} == want
            for s in range(slots):
                if held[s] != EMPTY:
                    assert ws.k[r, s].item() == held[s] == -ws.v[r, s].item()
            missing |= {(r, b) for b in want - set(before[r].tolist())}
            assert all(ws._slot_of[r, b] == s for s, b in enumerate(held) if b != EMPTY)
        assert sorted(sum(fetched, [])) == sorted(missing)  # each (head, block) a head lacked, once
        assert int((ws._slot_of != EMPTY).sum()) == int((ws.block_of != EMPTY).sum())


def test_block_missing_from_the_store_fails_loudly() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"m")
    k, v = random_kv(64)
    fill(kv, k, v, 64)
    kv.flush()
    for key in kv.block_keys[1:-1]:
        assert store.memory is not None
        store.memory.delete(key)
    with pytest.raises(BlockMissingError, match="no tier"):
        kv.attend(0, torch.randn(4, 1, D), D**-0.5)


def test_bad_configurations() -> None:
    with pytest.raises(SparseConfigError, match="smaller than sinks \\+ window"):
        SparseConfig(budget_tokens=32, block_tokens=16, sink_tokens=16, window_tokens=16)
    with pytest.raises(SparseConfigError, match="unknown"):
        SparseConfig(policy="nope")
    with pytest.raises(SparseConfigError, match="whole number"):
        SparseConfig(budget_tokens=100, block_tokens=16)
    with pytest.raises(SparseConfigError, match="chunk_tokens"):
        SparseKV(make_store(block=8), config(block=4), LAYOUT)
    for margin in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(SparseConfigError, match="keep_margin"):
            SparseConfig(keep_margin=margin)


def test_the_latest_tokens_block_is_attended_even_with_no_window() -> None:
    """Bug: with window_tokens 0 the block holding the latest token (the tail empty once it filled
    the block) was a candidate like any other: the query could leave itself out."""
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.sparse import sparse_store_layout
    from kvtier.store.tiered import TieredStore

    layout = KVLayout(1, 1, 4)
    store = TieredStore(StoreConfig(chunk_tokens=2, memory=MemoryTierConfig(capacity_bytes=1 << 20)),
                        sparse_store_layout(layout))
    cfg = SparseConfig(policy="quest", budget_tokens=6, block_tokens=2, sink_tokens=0, window_tokens=0)
    assert cfg.window_blocks == 1
    kv = SparseKV(store, cfg, layout, async_writes=False)
    k = torch.tensor([[[5.0, 0, 0, 0]] * 4 + [[-5.0, 0, 0, 0]] * 2])  # blocks 0, 1 match the query; block 2 not
    v = torch.arange(24, dtype=torch.float32).view(1, 6, 4)
    kv.append(0, k, v)  # 6 tokens: the latest (position 5) in block 2, the tail empty
    kv.attend(0, torch.tensor([[[1.0, 0, 0, 0]]]), 1.0)
    ws = kv.working[0]
    assert 5 in ws.token_positions(6)[ws.token_mask()].tolist()
    store.close()


def test_layers_must_append_the_same_span() -> None:
    store = make_store()
    kv = SparseKV(store, config(), LAYOUT, salt=b"o")
    k, v = random_kv(8)
    kv.append(0, k[0], v[0])
    with pytest.raises(RuntimeError, match="layer 0"):
        kv.append(1, k[1, :, :4], v[1, :, :4])


# -- per-head fetch: one section per (layer, KV head, K or V), each with its own checksum -------------
def needle_kv(t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random keys, except that head 0's block 3 points along e0, head 1's block 5 along e1,
    head 1's block 7 along e2 and head 0's block 7 along e3: quest with one retrieval slot picks
    exactly those for queries along the same axes."""
    k, v = random_kv(t, seed=4)
    k *= 0.01
    for head, block, axis in ((0, 3, 0), (1, 5, 1), (1, 7, 2), (0, 7, 3)):
        k[:, head, block * BT : (block + 1) * BT, axis] = 10.0
    return k, v


def axis_query(*axes: int) -> torch.Tensor:
    q = torch.zeros(len(axes), 1, D)  # one query head per KV head
    for h, a in enumerate(axes):
        q[h, 0, a] = 1.0
    return q


def section_bytes(store) -> int:
    return store.layer_bytes  # one head's K (or V) of one block


def test_a_block_one_head_wants_fetches_only_that_heads_slice() -> None:
    from kvtier.core import metrics as m

    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"h")  # slots: sink, window, 1 pick
    k, v = needle_kv()
    fill(kv, k, v, 40)  # 10 full blocks, no tail
    kv.flush()
    assert section_bytes(store) == BT * D * 4
    ws = kv.working[0]
    kv.attend(0, axis_query(0, 1), D**-0.5)
    assert ws.block_of[0].tolist().count(3) == 1 and ws.block_of[1].tolist().count(5) == 1
    slices, blocks, fetched = ws.fetched_slices, ws.fetched_blocks, kv.fetched_bytes
    read = store.metrics.get(m.BYTES_READ, tier="memory")
    out = kv.attend(0, axis_query(0, 2), D**-0.5)  # head 1 moves to block 7, head 0 stays
    assert ws.fetched_slices - slices == 1 and ws.fetched_blocks - blocks == 1
    assert kv.fetched_bytes - fetched == 2 * section_bytes(store)  # head 1's K and V of block 7, not head 0's
    assert store.metrics.get(m.BYTES_READ, tier="memory") - read == 2 * section_bytes(store)
    slot = ws.block_of[1].tolist().index(7)
    assert torch.equal(ws.k[1, slot], k[0, 1, 28:32]) and torch.equal(ws.v[1, slot], v[0, 1, 28:32])
    ref = dense_ref(axis_query(0, 2)[1:], k[0, 1:2, [*range(4), 28, 29, 30, 31, *range(36, 40)]],
                    v[0, 1:2, [*range(4), 28, 29, 30, 31, *range(36, 40)]])
    assert torch.allclose(out[1], ref[0], atol=1e-6)


def test_a_corrupt_head_slice_fails_loudly_and_only_when_read() -> None:
    store = make_store()  # DRAM only: no clean copy to fall back on
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"c")
    k, v = needle_kv()
    fill(kv, k, v, 40)
    kv.flush()
    assert store.memory is not None
    slot = store.memory.slot_of(kv.block_keys[7])
    assert slot is not None
    store.memory.layer_view(slot, kv._section(0, 0, 1))[5] ^= 0xFF  # head 0's V of block 7, layer 0
    ws = kv.working[0]
    kv.attend(0, axis_query(0, 1), D**-0.5)
    # head 1 reads its own slice of block 7: verified on its own, the corrupt head-0 slice is not read
    out = kv.attend(0, axis_query(0, 2), D**-0.5)
    assert 7 in ws.block_of[1].tolist() and torch.isfinite(out).all()
    with pytest.raises(BlockMissingError, match="head 0.*\\[7\\].*checksum"):
        kv.attend(0, axis_query(3, 2), D**-0.5)  # head 0 now wants block 7
    assert 7 not in ws.block_of[0].tolist()  # the slot that received the bad bytes holds nothing
    with pytest.raises(BlockMissingError):  # and it stays a loud failure, never garbage
        kv.attend(0, axis_query(3, 2), D**-0.5)


@pytest.mark.parametrize("policy,margin", [(p, 0.0) for p in ("quest", "quest_share", "hash", "mean", "oracle",
                                                                 "quest_mean")] + [("quest", 1.0), ("hash", 3.0)])
def test_per_head_slices_equal_the_stored_kv_over_moving_queries(policy: str, margin: float, tmp_path) -> None:
    """Decoding with a new query every step (GQA, 2 query heads per KV head, blocks partly on disk):
    every slot the working set attends holds exactly the stored K and V of its (block, head), and
    the output is attention over exactly those tokens, as the whole-block path computed it."""
    store = make_store(memory_bytes=6 * 2 * L * H * BT * D * 4, disk_root=str(tmp_path))
    kv = SparseKV(store, config(policy, budget=24, window=8, keep_margin=margin), LAYOUT, salt=b"e")  # 2 picks
    k, v = random_kv(90, seed=9)
    for layer in range(L):
        kv.append(layer, k[layer, :, :60], v[layer, :, :60])
    kv.flush()
    g = torch.Generator().manual_seed(11)
    for t in range(60, 90):
        for layer in range(L):
            kv.append(layer, k[layer, :, t : t + 1], v[layer, :, t : t + 1])
            q = torch.randn(2 * H, 1, D, generator=g)
            out = kv.attend(layer, q, D**-0.5)
            ws = kv.working[layer]
            n = t + 1
            mask = ws.token_mask()
            pos = ws.token_positions(n // BT * BT)
            for h in range(H):
                p = pos[h][mask[h]]
                assert torch.equal(ws.k[h].reshape(-1, D)[mask[h]], k[layer, h, p])
                assert torch.equal(ws.v[h].reshape(-1, D)[mask[h]], v[layer, h, p])
                ref = F.scaled_dot_product_attention(q[2 * h : 2 * h + 2].view(1, 2, D), k[layer, h, p].unsqueeze(0),
                                                     v[layer, h, p].unsqueeze(0), scale=D**-0.5)
                assert torch.allclose(out[2 * h : 2 * h + 2, 0], ref[0], atol=1e-6)
    assert sum(ws.fetched_slices for ws in kv.working) > 0
    store.close()


def test_store_must_hold_the_kv_per_head() -> None:
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.core.layout import KVLayout
    from kvtier.sparse import sparse_store_layout
    from kvtier.store.tiered import TieredStore

    assert sparse_store_layout(KVLayout(3, 4, 8, "float16")) == KVLayout(24, 1, 8, "float16", planes=1)
    whole = TieredStore(StoreConfig(chunk_tokens=BT, memory=MemoryTierConfig(capacity_bytes=1 << 20)), LAYOUT)
    with pytest.raises(SparseConfigError, match="sparse_store_layout"):
        SparseKV(whole, config(), LAYOUT)
    whole.close()


def fetched_over_drifting_queries(margin: float) -> tuple[int, list[torch.Tensor]]:
    """Slices fetched over 40 decode steps whose queries drift (each keeps 0.9 of the last), and the picks."""
    store = make_store(layers=1, memory_bytes=1 << 24)
    kv = SparseKV(store, config("quest", budget=48, keep_margin=margin), KVLayout(1, H, D), salt=b"m")  # 9 picks
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, H, 400, D, generator=g), torch.randn(1, H, 400, D, generator=g)
    kv.append(0, k[0, :, :360], v[0, :, :360])
    q = torch.randn(H, 1, D, generator=g)
    picks = []
    for t in range(360, 400):
        kv.append(0, k[0, :, t : t + 1], v[0, :, t : t + 1])
        q = 0.9 * q + 0.44 * torch.randn(H, 1, D, generator=g)
        kv.attend(0, q, D**-0.5)
        picks.append(kv._picks[0].clone())
    fetched = kv.working[0].fetched_slices
    store.close()
    return fetched, picks


def test_keep_margin_fetches_less_over_drifting_queries() -> None:
    plain, plain_picks = fetched_over_drifting_queries(0.0)
    sticky, sticky_picks = fetched_over_drifting_queries(1.0)
    assert sticky < plain
    # the first step has nothing held, so both pick the plain top-k
    assert [sorted(r) for r in sticky_picks[0].tolist()] == [sorted(r) for r in plain_picks[0].tolist()]
