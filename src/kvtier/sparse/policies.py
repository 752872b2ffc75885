"""Selection policies: which blocks of one layer the current query needs, per KV head.

Each policy turns the queries of a KV head's group (GQA: all query heads sharing that KV
head, times the step's query tokens) and the fast-memory summaries of the candidate blocks
into one priority per (KV head, block); the caller keeps the top `retrieval_slots` next to
the always-kept sinks, window and tail. Scoring policies first estimate a logit per (query
head, block), then `group_mass` sums each query head's softmax over blocks, so every head of
the group gets a say whatever its logit scale.

    dense       reference: every block, the working set grows to the whole context
    streaming   StreamingLLM: the most recent blocks (cannot retrieve)
    quest       Quest: upper bound of q.k from per-channel min/max (two matmuls)
    mean        block-mean retrieval (UCM ESA): q . mean(k)
    hash        HATA/KVComp-style sign hash of every key: |k| sqrt(pi/2)/bits * sign(R^T k) . (R^T q)
                estimates each q.k from 64 bits + a norm per key (12 bytes instead of 4 * head_size);
                a block scores its best key. Scored with one table lookup per byte of code
    quest_mean  half the Quest bound plus half the mean logit: the bound's recall, less of its
                optimism for blocks with one outlier channel
    quest_share the Quest bound as each query head's share of its whole attention (softmax over
                every summarized block, the always-kept sinks and window included), max over the
                group: a head already served by its sinks and window barely votes, and one head's
                sharp need is not diluted by the others' flat ones
    oracle      eval only: true attention mass from the block's keys (reads every key)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvtier.sparse.summary import SummaryTable, unpack_signs


def group_mass(logits: torch.Tensor) -> torch.Tensor:
    """[H, g, n] logits -> [H, n]: softmax over blocks per query head, summed over the group.

    Only the order of priorities is used (the caller keeps the top ones), so a group of one
    query row returns its logits: the softmax would not change their order."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    return torch.softmax(logits, dim=-1).sum(1)


class SelectionPolicy(ABC):
    name: ClassVar[str]
    summary_fields: ClassVar[tuple[str, ...]] = ()
    needs_keys: ClassVar[bool] = False  # oracle: wants the candidate blocks' keys
    dense: ClassVar[bool] = False  # selects everything, ignoring the budget

    def __init__(self, projection: torch.Tensor | None = None) -> None:
        self.projection = projection

    @abstractmethod
    def priority(self, q: torch.Tensor, table: SummaryTable, lo: int, hi: int, scaling: float,
                 keys: torch.Tensor | None = None) -> torch.Tensor:
        """Priority [H, hi - lo] of blocks lo..hi-1 for queries q [H, g, d] (g = group heads x query
        tokens); higher is kept first, only the order matters."""


class DensePolicy(SelectionPolicy):
    name = "dense"
    dense = True

    def priority(self, q, table, lo, hi, scaling, keys=None):
        return torch.zeros(q.shape[0], hi - lo, device=q.device)


class StreamingPolicy(SelectionPolicy):
    name = "streaming"

    def priority(self, q, table, lo, hi, scaling, keys=None):
        return torch.arange(lo, hi, dtype=torch.float32, device=q.device).expand(q.shape[0], -1)


def scores(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [H, g, d] . rows [H, n, d] -> [H, g, n], computed as (rows q^T)^T: with few query rows MKL
    runs that as a matrix-vector product at memory speed, ~3x faster than q @ rows^T."""
    return (rows @ q.transpose(1, 2)).transpose(1, 2)


def quest_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """sum_i max(q_i kmin_i, q_i kmax_i) as two matmuls: relu(q).kmax + min(q, 0).kmin -> [H, g, n]."""
    return scores(q.clamp(min=0), kmax) + scores(q.clamp(max=0), kmin)


def summary_logits(q: torch.Tensor, table: SummaryTable, lo: int, hi: int, bound: bool, mean: bool) -> torch.Tensor:
    """[H, g, n] over blocks lo..hi-1: the Quest bound (`bound`) plus q . kmean (`mean`).

    A float32 table is read in place (the matmuls as they always were). A 16-bit one (SparseKV keeps
    the bounds in the KV's dtype) is upcast a piece at a time (SummaryTable.upcast_pieces) and scored
    by one matmul per piece: relu(q).kmax + min(q, 0).kmin + q.kmean is [relu(q), min(q, 0), q] .
    [kmax, kmin, kmean], so the kernels per layer stay as few as the float32 path's."""
    if table.bounds_dtype == torch.float32:
        out = quest_bound(q, table.get("kmin", lo, hi), table.get("kmax", lo, hi)) if bound else None
        if mean:
            m = scores(q, table.get("kmean", lo, hi))
            out = m if out is None else out + m
        assert out is not None, "neither the bound nor the mean asked for"
        return out
    fields: tuple[str, ...] = (("kmax", "kmin") if bound else ()) + (("kmean",) if mean else ())
    qs = ((q.clamp(min=0), q.clamp(max=0)) if bound else ()) + ((q,) if mean else ())
    qq = torch.cat(qs, -1) if len(qs) > 1 else qs[0]
    parts = [scores(qq, rows) for rows in table.upcast_pieces(fields, lo, hi)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


class QuestPolicy(SelectionPolicy):
    name = "quest"
    summary_fields = ("kmin", "kmax")

    def priority(self, q, table, lo, hi, scaling, keys=None):
        return group_mass(summary_logits(q, table, lo, hi, bound=True, mean=False) * scaling)


class MeanPolicy(SelectionPolicy):
    name = "mean"
    summary_fields = ("kmean",)

    def priority(self, q, table, lo, hi, scaling, keys=None):
        return group_mass(summary_logits(q, table, lo, hi, bound=False, mean=True) * scaling)


class QuestMeanPolicy(SelectionPolicy):
    name = "quest_mean"
    summary_fields = ("kmin", "kmax", "kmean")

    def priority(self, q, table, lo, hi, scaling, keys=None):
        return group_mass(summary_logits(q, table, lo, hi, bound=True, mean=True) * (0.5 * scaling))


class QuestSharePolicy(SelectionPolicy):
    name = "quest_share"
    summary_fields = ("kmin", "kmax")

    def priority(self, q, table, lo, hi, scaling, keys=None):
        # every block the table holds (0..num_blocks): the candidates lo..hi-1 and the blocks kept
        # anyway; only summaries and the current query are read
        bound = summary_logits(q, table, 0, table.num_blocks, bound=True, mean=False) * scaling  # [H, g, n]
        return torch.softmax(bound, dim=-1)[..., lo:hi].amax(1)


# the +-1 signs of the 8 bits of every byte value, little-endian as pack_signs writes them
_BYTE_SIGNS = unpack_signs(torch.arange(256, dtype=torch.uint8).unsqueeze(1))  # [256, 8]


def hash_lut(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """hash_logits' lookup table for queries q [H, g, d]: row (head, code byte, byte value) = that
    byte's partial sum of sign(r_j.k) (r_j.q) over its 8 bits, [H * bits/8 * 256, g]."""
    h, g, _ = q.shape
    m = projection.shape[1] // 8
    qp = (q @ projection).unflatten(-1, (m, 8))  # [H, g, m, 8]
    dev = q.device
    lut = torch.empty(h * m * 256, g, device=dev)  # fresh strides keep embedding_bag's fast path
    lut.view(h, m, 256, g).copy_((qp @ _BYTE_SIGNS.to(dev).T).permute(0, 2, 3, 1))
    return lut


def hash_lookup(lut: torch.Tensor, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Estimated q.k [H, g, N] of keys with codes [H, N, bits/8] and norms [H, N] from `hash_lut`."""
    h, n, m = codes.shape
    g = lut.shape[1]
    dev = codes.device
    base = torch.arange(h, dtype=torch.int32, device=dev).view(h, 1, 1) * (m * 256) + torch.arange(
        0, m * 256, 256, dtype=torch.int32, device=dev)
    idx = (codes.to(torch.int32) + base).view(h * n, m)
    est = F.embedding_bag(idx, lut, mode="sum").view(h, n, g).transpose(1, 2)  # [H, g, N]
    return est * norms.unsqueeze(1) * (math.sqrt(math.pi / 2) / (8 * m))


def hash_logits(q: torch.Tensor, codes: torch.Tensor, norms: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Estimated q.k of every key from its sign bits and norm: q [H, g, d], codes [H, N, bits/8],
    norms [H, N] -> [H, g, N]. E[sign(r.k) (r.q)] = sqrt(2/pi) q.k / |k| for r ~ N(0, I), so
    |k| sqrt(pi/2) / bits * sum_j sign(r_j.k) (r_j.q) is unbiased. The sum over bits is one
    lookup per code byte in a [256] table of that byte's partial sums (no unpacked bits), gathered
    and summed by one embedding_bag over int32 indices."""
    return hash_lookup(hash_lut(q, projection), codes, norms)


# the hash policy's scan holds at most about this many bytes of per-key temporaries at once (int32
# lookup indices, float32 estimates): at 128k tokens of 8 KV heads a one-piece scan held ~100 MiB
HASH_SCAN_BYTES = 8 << 20


class HashPolicy(SelectionPolicy):
    name = "hash"
    summary_fields = ("codes", "norms")

    def priority(self, q, table, lo, hi, scaling, keys=None):
        assert self.projection is not None, "the hash policy needs the summarizer's projection"
        h, g = q.shape[0], q.shape[1]
        if hi <= lo:
            return torch.zeros(h, 0, device=q.device)
        lut = hash_lut(q, self.projection)
        bt, m = table.get("codes", lo, lo).shape[2:]
        step = max(1, HASH_SCAN_BYTES // (h * bt * (8 * m + 12 * g)))  # idx twice, est three times, per key
        parts = []
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            codes = table.get("codes", a, b)  # [H, n, B, bits/8]
            est = hash_lookup(lut, codes.flatten(1, 2), table.get("norms", a, b).flatten(1))
            parts.append(est.view(h, g, b - a, bt).amax(-1))
        best = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return group_mass(best * scaling)


class OraclePolicy(SelectionPolicy):
    """The true attention mass of each candidate block (evaluation only: it reads every key)."""

    name = "oracle"
    needs_keys = True

    def priority(self, q, table, lo, hi, scaling, keys=None):
        assert keys is not None, "the oracle policy needs the candidate blocks' keys"
        h, g, _ = q.shape
        probs = torch.softmax(scores(q, keys) * scaling, dim=-1)  # [H, g, n*B]
        return probs.reshape(h, g, hi - lo, -1).sum(-1).sum(1)


def sticky_topk(priority: torch.Tensor, held: torch.Tensor | None, k: int, margin: float) -> torch.Tensor:
    """Indices [H, k] of the blocks to keep: the top k by priority [H, n], except that a block already
    held (held [H, n] bool) counts its rank (0 = best) as rank / (1 + margin), so it stays while it
    ranks within about the top k (1 + margin) and is displaced only by a block that ranks clearly
    better. margin 0 is plain top-k."""
    if held is None or margin <= 0 or not bool(held.any()):
        return torch.topk(priority, k, dim=1, sorted=False).indices
    h, n = priority.shape
    order = torch.argsort(priority, dim=1, descending=True, stable=True)
    rank = torch.empty(h, n, device=priority.device)
    rank.scatter_(1, order, torch.arange(n, dtype=torch.float32, device=priority.device).expand(h, n))
    rank = torch.where(held, rank / (1.0 + margin), rank)
    return torch.topk(rank, k, dim=1, largest=False, sorted=False).indices


POLICIES: dict[str, type[SelectionPolicy]] = {
    cls.name: cls
    for cls in (DensePolicy, StreamingPolicy, QuestPolicy, MeanPolicy, HashPolicy, QuestMeanPolicy, QuestSharePolicy,
                OraclePolicy)
}


def make_policy(name: str, projection: torch.Tensor | None = None) -> SelectionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        from kvtier.sparse.errors import SparseConfigError

        raise SparseConfigError(f"sparse.policy {name!r} is unknown; choose one of {sorted(POLICIES)}") from None
    return cls(projection)
