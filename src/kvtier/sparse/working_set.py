"""WorkingSet: one layer's fast-memory KV, a fixed number of block slots per KV head.

K and V are [H, slots + 1, block_tokens, head_size]; the last slot is the tail (the block
still being filled). Each KV head maps its slots to block ids on its own, since GQA heads
select different blocks. `ensure(wanted)` keeps the slots whose block is still wanted and
fills the others with the missing blocks, fetched once per block for all heads that want
it: a step moves only the blocks that changed since the last one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EMPTY = -1


class WorkingSet:
    def __init__(self, kv_heads: int, slots: int, block_tokens: int, head_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.kv_heads = kv_heads
        self.slots = slots
        self.block_tokens = block_tokens
        self.k = torch.zeros(kv_heads, slots + 1, block_tokens, head_size, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.block_of = torch.full((kv_heads, slots), EMPTY, dtype=torch.long)
        self.last_used = torch.zeros(kv_heads, slots, dtype=torch.long)
        self.tail_len = 0
        self._clock = 0
        self.fetched_blocks = 0  # blocks read from the store, summed over steps (per block, not per head)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def grow(self, slots: int) -> None:
        """Add slots (the dense reference policy's working set holds the whole context)."""
        if slots <= self.slots:
            return
        h, _, b, d = self.k.shape
        k = torch.zeros(h, slots + 1, b, d, dtype=self.k.dtype)
        v = torch.zeros_like(k)
        k[:, : self.slots] = self.k[:, : self.slots]
        v[:, : self.slots] = self.v[:, : self.slots]
        k[:, slots] = self.k[:, self.slots]
        v[:, slots] = self.v[:, self.slots]
        extra = slots - self.slots
        self.block_of = torch.cat([self.block_of, torch.full((h, extra), EMPTY, dtype=torch.long)], 1)
        self.last_used = torch.cat([self.last_used, torch.zeros(h, extra, dtype=torch.long)], 1)
        self.k, self.v, self.slots = k, v, slots

    # -- tail ------------------------------------------------------------------------
    def append_tail(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append n < block_tokens - tail_len tokens ([H, n, d]) to the tail."""
        n = k.shape[1]
        assert self.tail_len + n <= self.block_tokens
        self.k[:, self.slots, self.tail_len : self.tail_len + n] = k
        self.v[:, self.slots, self.tail_len : self.tail_len + n] = v
        self.tail_len += n

    def tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, self.slots, : self.tail_len], self.v[:, self.slots, : self.tail_len]

    def reset_tail(self) -> None:
        self.tail_len = 0

    # -- full blocks -----------------------------------------------------------------
    def insert(self, block: int, k: torch.Tensor, v: torch.Tensor, protected: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Place a just-completed block ([H, B, d] each) in every head, evicting per head an empty
        slot, else the least recently used slot whose block is not `protected` (sinks, window)."""
        cost = self.last_used.clone()
        cost[protected(self.block_of)] = torch.iinfo(torch.long).max
        cost[self.block_of == EMPTY] = -1
        present = (self.block_of == block).any(1)
        slot = torch.where(present, (self.block_of == block).long().argmax(1), cost.argmin(1))
        heads = torch.arange(self.kv_heads)
        self.k[heads, slot] = k
        self.v[heads, slot] = v
        self.block_of[heads, slot] = block
        self._clock += 1
        self.last_used[heads, slot] = self._clock

    def ensure(self, wanted: torch.Tensor, fetch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Make the working set hold wanted [H, m] (m <= slots, distinct per row, EMPTY = padding).

        `fetch(block_ids)` returns (K, V) as [n, H, B, d] for those blocks. Returns the number
        of blocks fetched.
        """
        h, m = wanted.shape
        if m > self.slots:
            raise ValueError(f"{m} blocks wanted but the working set has {self.slots} slots")
        self._clock += 1
        match = (wanted.unsqueeze(2) == self.block_of.unsqueeze(1)) & (wanted != EMPTY).unsqueeze(2)  # [H, m, S]
        have = match.any(2)
        keep = match.any(1)
        self.last_used[keep] = self._clock
        need = (~have) & (wanted != EMPTY)
        if not bool(need.any()):
            return 0
        need_heads, need_pos = need.nonzero(as_tuple=True)
        need_blocks = wanted[need_heads, need_pos]
        # the r-th missing block of head h goes to the r-th free slot of head h
        need_rank = torch.cumsum(need.long(), 1)[need_heads, need_pos] - 1
        free = ~keep
        free_rank = torch.cumsum(free.long(), 1) - 1
        free_heads, free_slots = free.nonzero(as_tuple=True)
        slot_of_rank = torch.full((h, self.slots), EMPTY, dtype=torch.long)
        slot_of_rank[free_heads, free_rank[free_heads, free_slots]] = free_slots
        dest = slot_of_rank[need_heads, need_rank]
        uniq, inverse = torch.unique(need_blocks, return_inverse=True)
        k, v = fetch(uniq.tolist())
        self.k[need_heads, dest] = k[inverse, need_heads]
        self.v[need_heads, dest] = v[inverse, need_heads]
        self.block_of[need_heads, dest] = need_blocks
        self.last_used[need_heads, dest] = self._clock
        self.fetched_blocks += len(uniq)
        return len(uniq)
