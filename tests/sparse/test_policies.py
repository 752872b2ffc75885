"""Each policy's selection on hand-made keys and queries whose answer is known."""

from __future__ import annotations

import pytest
import torch

from kvtier.sparse import POLICIES, SparseConfigError, Summarizer, SummaryTable, make_policy
from kvtier.sparse.policies import hash_logits, quest_bound, sticky_topk
from kvtier.sparse.summary import FIELDS

B = 2
D = 4


def table_of(keys: torch.Tensor, fields: tuple[str, ...] = FIELDS) -> tuple[SummaryTable, Summarizer]:
    """keys [H, n*B, D] -> a summary table of all fields."""
    s = Summarizer(keys.shape[0], D, hash_bits=64, seed=0)
    t = SummaryTable(keys.shape[0], D, 64, fields, B)
    t.append(s.compute(keys, B))
    return t, s


def one_hot_blocks() -> torch.Tensor:
    """6 blocks of 2 tokens, 1 KV head; block b's keys point along channel b % 4, block 3 is strongest."""
    k = torch.zeros(1, 6 * B, D)
    for b in range(6):
        k[0, b * B : (b + 1) * B, b % D] = 1.0
    k[0, 3 * B : 4 * B, 3] = 4.0
    k[0, 5 * B : 6 * B, 1] = 0.5
    return k


def top(policy: str, q: torch.Tensor, keys: torch.Tensor, lo: int, hi: int, k: int) -> list[int]:
    t, s = table_of(keys)
    p = make_policy(policy, s.projection)
    cand = keys[:, lo * B : hi * B] if p.needs_keys else None
    pri = p.priority(q, t, lo, hi, D**-0.5, cand)
    return sorted((torch.topk(pri, k, dim=1).indices[0] + lo).tolist())


@pytest.mark.parametrize("policy", ["quest", "mean", "hash", "quest_mean", "quest_share", "oracle"])
def test_scoring_policies_find_the_aligned_block(policy: str) -> None:
    keys = one_hot_blocks()
    q = torch.tensor([[[0.0, 0.0, 0.0, 3.0]]])  # points along channel 3: block 3
    assert top(policy, q, keys, 1, 5, 1) == [3]
    q = torch.tensor([[[0.0, 3.0, 0.0, 0.0]]])  # channel 1: blocks 1 and 5 (5 is outside lo..hi)
    assert top(policy, q, keys, 0, 5, 1) == [1]


def test_streaming_picks_the_most_recent_candidates() -> None:
    keys = one_hot_blocks()
    q = torch.tensor([[[0.0, 0.0, 0.0, 3.0]]])
    assert top("streaming", q, keys, 1, 5, 2) == [3, 4]


def test_dense_policy_is_flagged_dense() -> None:
    assert make_policy("dense").dense and not make_policy("quest").dense


def test_quest_bound_is_the_max_over_the_box_per_channel() -> None:
    kmin = torch.tensor([[[-1.0, 2.0]]])
    kmax = torch.tensor([[[3.0, 5.0]]])
    q = torch.tensor([[[-2.0, 1.0]]])
    # channel 0: max(-2*-1, -2*3) = 2; channel 1: max(2, 5) = 5
    assert quest_bound(q, kmin, kmax).item() == pytest.approx(7.0)


def test_quest_bound_is_an_upper_bound_of_every_key() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 8 * B, D, generator=g)
    q = torch.randn(2, 3, D, generator=g)
    t, _ = table_of(keys)
    bound = quest_bound(q, t.get("kmin"), t.get("kmax"))  # [H, g, n]
    exact = (q @ keys.transpose(1, 2)).unflatten(-1, (8, B)).amax(-1)
    assert bool((bound >= exact - 1e-6).all())


def test_oracle_prefers_true_mass_where_quest_is_fooled() -> None:
    """Block 1's box is large (two opposite keys) but no key aligns with q; block 2 holds q's direction."""
    k = torch.zeros(1, 3 * B, D)
    k[0, 0:B, 2] = 1.0
    k[0, B, :2] = torch.tensor([3.0, -3.0])
    k[0, B + 1, :2] = torch.tensor([-3.0, 3.0])
    k[0, 2 * B : 3 * B, :2] = torch.tensor([1.2, 1.2])
    q = torch.tensor([[[2.0, 2.0, 0.0, 0.0]]])
    assert top("quest", q, k, 0, 3, 1) == [1]  # bound 12 beats 4.8: a false positive
    assert top("oracle", q, k, 0, 3, 1) == [2]
    assert top("mean", q, k, 0, 3, 1) == [2]


def test_gqa_group_heads_each_get_their_block() -> None:
    """Two query heads share one KV head and look for different blocks: both are kept."""
    keys = one_hot_blocks()
    q = torch.tensor([[[0.0, 0.0, 0.0, 3.0], [3.0, 0.0, 0.0, 0.0]]])  # block 3 and block 0 (channel 0)
    for policy in ("quest", "mean", "quest_share", "oracle"):
        assert top(policy, q, keys, 0, 5, 2) == [0, 3], policy


def test_quest_share_discounts_a_head_served_by_the_kept_blocks() -> None:
    """Head A attends almost only to the sink (block 0) and mildly prefers candidate 2; head B has
    nothing outside the candidates and wants block 3. Quest normalizes each head over the
    candidates only, so A's mild preference outvotes B; quest_share sees that block 2 would carry
    ~0.2% of A's attention against ~40% of B's for block 3."""
    k = torch.zeros(1, 5 * B, D)
    k[0, 0:B, 0] = 5.0  # sink
    k[0, B : 2 * B, 1] = 1.0
    k[0, 2 * B : 3 * B, 2] = 1.0
    k[0, 3 * B : 4 * B, 3] = 1.0  # block 4 (the window) stays zero
    q = torch.tensor([[[3.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])  # [1 KV head, 2 query heads, D]
    assert top("quest", q, k, 1, 4, 1) == [2]
    assert top("quest_share", q, k, 1, 4, 1) == [3]
    t, _ = table_of(k)
    pri = make_policy("quest_share").priority(q, t, 1, 4, D**-0.5)
    share = torch.softmax(quest_bound(q, t.get("kmin"), t.get("kmax")) * D**-0.5, -1)  # [1, 2, 5]
    assert torch.allclose(pri, share[..., 1:4].amax(1))
    assert share[0, 0, 2] < 0.01 and pri[0, 2] > 0.35  # A's share of block 2; B's of block 3


def test_selection_is_per_kv_head() -> None:
    keys = torch.cat([one_hot_blocks(), one_hot_blocks().roll(B, dims=1)])  # head 1: blocks shifted by one
    t, _ = table_of(keys)
    q = torch.tensor([[[0.0, 0.0, 0.0, 3.0]], [[0.0, 0.0, 0.0, 3.0]]])
    pri = make_policy("quest").priority(q, t, 0, 6, D**-0.5)
    assert pri.argmax(1).tolist() == [3, 4]


def test_registry_and_unknown_policy() -> None:
    assert {"dense", "streaming", "quest", "mean", "hash", "quest_mean", "quest_share", "oracle"} <= set(POLICIES)
    with pytest.raises(SparseConfigError, match="unknown"):
        make_policy("nope")


def test_hash_logits_estimate_q_dot_k_without_bias() -> None:
    """The per-key sign-hash estimate, averaged over many projections, converges to q.k."""
    g = torch.Generator().manual_seed(3)
    d, bits = 8, 4096
    keys = torch.randn(1, 5, d, generator=g)
    q = torch.randn(1, 2, d, generator=g)
    s = Summarizer(1, d, hash_bits=bits, seed=0)
    summ = s.compute(keys, 5)
    est = hash_logits(q, summ.codes.flatten(1, 2), summ.norms.flatten(1), s.projection)
    exact = q @ keys.transpose(1, 2)
    scale = q.norm(dim=-1, keepdim=True) * keys.norm(dim=-1).unsqueeze(1)
    assert est.shape == (1, 2, 5)
    assert bool(((est - exact).abs() < 0.1 * scale).all())


def test_hash_scores_a_block_by_its_best_key() -> None:
    """One needle key among noise: the hash policy ranks the needle's block first (the mean hides it)."""
    g = torch.Generator().manual_seed(0)
    bt, n, d = 8, 6, 16
    keys = torch.randn(1, n * bt, d, generator=g)
    needle = torch.randn(d, generator=g)
    keys[0, 4 * bt + 3] = 3 * needle
    s = Summarizer(1, d, hash_bits=64, seed=0)
    t = SummaryTable(1, d, 64, FIELDS, bt)
    t.append(s.compute(keys, bt))
    pri = make_policy("hash", s.projection).priority(needle.view(1, 1, d), t, 0, n, d**-0.5)
    assert int(pri.argmax()) == 4


def test_sticky_topk_keeps_a_held_block_within_the_margin() -> None:
    pri = torch.tensor([[10.0, 9.0, 8.0, 7.0, 6.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    held = torch.zeros(2, 6, dtype=torch.bool)
    held[0, 3] = True  # rank 3 in head 0
    held[1, 0] = True  # rank 5 in head 1

    def picks(margin: float) -> list[list[int]]:
        return [sorted(r) for r in sticky_topk(pri, held, 2, margin).tolist()]

    assert picks(0.0) == [[0, 1], [4, 5]]  # plain top-2
    assert picks(0.5) == [[0, 1], [4, 5]]  # rank 3 counts as 2, rank 5 as 3.3: still out
    assert picks(3.0) == [[0, 3], [4, 5]]  # rank 3 counts as 0.75: it displaces rank 1; rank 5 counts as 1.25
    assert picks(9.0) == [[0, 3], [0, 5]]  # rank 5 counts as 0.5: it displaces rank 1 (block 4)
    assert picks(9.0) == [sorted(r) for r in sticky_topk(pri, held, 2, 9.0).tolist()]
    assert sorted(sticky_topk(pri, None, 2, 9.0)[0].tolist()) == [0, 1]  # nothing held: plain top-k
