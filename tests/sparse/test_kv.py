"""SparseKV: dense equivalence, the always-kept blocks, the byte budget, faults and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvtier.sparse import BlockMissingError, SparseConfig, SparseConfigError, SparseKV, WorkingSet
from kvtier.sparse.working_set import EMPTY

from .helpers import config, fill, make_store

L, H, D, BT = 2, 2, 8, 4


def dense_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Hq, 1, d] against k, v [H, T, d] with GQA."""
    g = q.shape[0] // k.shape[0]
    out = F.scaled_dot_product_attention(q.reshape(k.shape[0], g, D), k, v, scale=D**-0.5)
    return out.reshape(q.shape)


def random_kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, t, D, generator=g), torch.randn(L, H, t, D, generator=g)


@pytest.mark.parametrize("policy", ["dense", "quest", "streaming", "mean", "hash", "oracle", "quest_mean", "quest_share"])
def test_budget_larger_than_context_is_dense(policy: str) -> None:
    store = make_store()
    kv = SparseKV(store, config(policy, budget=64), salt=policy.encode())
    k, v = random_kv(37)
    fill(kv, k, v, 21)
    q = torch.randn(4, 1, D, generator=torch.Generator().manual_seed(5))
    for layer in range(L):
        assert torch.allclose(kv.attend(layer, q, D**-0.5), dense_ref(q, k[layer], v[layer]), atol=1e-6)
        assert torch.allclose(kv.attend_dense(layer, q, D**-0.5), dense_ref(q, k[layer], v[layer]), atol=1e-6)


def test_dense_policy_attends_everything_past_the_budget() -> None:
    store = make_store()
    kv = SparseKV(store, config("dense", budget=12), salt=b"d")
    k, v = random_kv(61)
    fill(kv, k, v, 30)
    q = torch.randn(4, 1, D)
    assert torch.allclose(kv.attend(1, q, D**-0.5), dense_ref(q, k[1], v[1]), atol=1e-6)


def test_sparse_attention_is_exact_over_what_it_selected() -> None:
    """With one retrieval slot, the output equals dense attention restricted to sinks + window + pick + tail."""
    store = make_store()
    kv = SparseKV(store, config("oracle", budget=16), salt=b"s")  # 3 slots: sink, window, 1 pick; + tail
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
    kv = SparseKV(store, cfg, salt=policy.encode())
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
    kv = SparseKV(store, config("quest", budget=24), salt=b"f")
    k, v = random_kv(64)
    fill(kv, k, v, 64)
    q = torch.randn(4, 1, D)
    kv.attend(0, q, D**-0.5)
    before = kv.fetched_bytes
    kv.attend(0, q, D**-0.5)  # same query, same context: nothing changes
    assert kv.fetched_bytes == before


def test_retrieval_stride_reuses_the_picks() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24, retrieval_stride=4), salt=b"r")
    k, v = random_kv(64)
    fill(kv, k, v, 64)
    g = torch.Generator().manual_seed(0)
    kv.attend(0, torch.randn(4, 1, D, generator=g), D**-0.5)
    picks = kv._picks[0].clone()
    kv.attend(0, torch.randn(4, 1, D, generator=g), D**-0.5)
    assert torch.equal(kv._picks[0], picks)


def test_working_set_ensure_fills_free_slots_per_head() -> None:
    ws = WorkingSet(kv_heads=2, slots=3, block_tokens=1, head_size=1)
    calls: list[list[int]] = []

    def fetch(blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(blocks)
        t = torch.tensor(blocks, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 1, 1)
        return t, -t

    assert ws.ensure(torch.tensor([[1, 2, 3], [1, 4, EMPTY]]), fetch) == 4
    assert calls == [[1, 2, 3, 4]]
    assert ws.ensure(torch.tensor([[3, 5, 1], [4, 1, 6]]), fetch) == 2
    assert calls[-1] == [5, 6]
    assert sorted(ws.block_of[0].tolist()) == [1, 3, 5]
    assert sorted(ws.block_of[1].tolist()) == [1, 4, 6]
    for h in range(2):
        for s in range(3):
            assert ws.k[h, s].item() == ws.block_of[h, s].item() == -ws.v[h, s].item()


def test_working_set_slot_map_follows_random_ensures_and_inserts() -> None:
    """The block -> slot map behind `ensure` agrees with the slots after any mix of ensures (with
    padding, block ids past the map's size) and inserts: each wanted block held exactly once, its
    data in its slot, nothing fetched that was held."""
    rng = torch.Generator().manual_seed(3)
    h, slots = 3, 6
    ws = WorkingSet(kv_heads=h, slots=slots, block_tokens=1, head_size=1)
    fetched: list[list[int]] = []

    def fetch(blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        fetched.append(blocks)
        t = torch.tensor(blocks, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, h, 1, 1)
        return t, -t

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
        ws.ensure(wanted, fetch)
        mask = ws.token_mask()
        missing: set[int] = set()
        for r in range(h):
            want = {b for b in wanted[r].tolist() if b != EMPTY}
            held = ws.block_of[r].tolist()
            assert want <= set(held) and len([b for b in held if b in want]) == len(want)
            assert {held[s] for s in range(slots) if mask[r, s]} == want
            for s in range(slots):
                if held[s] != EMPTY:
                    assert ws.k[r, s].item() == held[s] == -ws.v[r, s].item()
            missing |= want - set(before[r].tolist())
            assert all(ws._slot_of[r, b] == s for s, b in enumerate(held) if b != EMPTY)
        assert sorted(sum(fetched, [])) == sorted(missing)  # each block some head lacked, once
        assert int((ws._slot_of != EMPTY).sum()) == int((ws.block_of != EMPTY).sum())


def test_block_missing_from_the_store_fails_loudly() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=16), salt=b"m")
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
        SparseKV(make_store(block=8), config(block=4))


def test_layers_must_append_the_same_span() -> None:
    store = make_store()
    kv = SparseKV(store, config(), salt=b"o")
    k, v = random_kv(8)
    kv.append(0, k[0], v[0])
    with pytest.raises(RuntimeError, match="layer 0"):
        kv.append(1, k[1, :, :4], v[1, :, :4])
