"""WorkingSet: one layer's fast-memory KV, a fixed number of block slots per KV head.

K and V are [H, slots + 1, block_tokens, head_size]; the last slot is the tail (the block
still being filled). Each KV head maps its slots to block ids on its own, since GQA heads
select different blocks. `ensure(wanted)` keeps the slots whose block is still wanted and
fills the others with the missing blocks: a step moves only the (block, head) slices that
some head newly wants, each written straight into its slot of the preallocated buffers by
the caller's `fill` (SparseKV reads each slice from the store, where every head's K and V of
a block are sections with their own checksums: a block one head wants costs that head's
bytes, not all heads').

The slot bookkeeping (which block each slot holds, when it was last used, which slots the
last `ensure` wanted) is a few hundred integers per layer, kept in numpy arrays: a decode
step runs it once per layer, where torch's per-op overhead on tensors this small would cost
more than the fetches it plans. `block_of` is a tensor view of the same memory. Its inverse,
`_slot_of` [H, blocks] (the slot holding each block, EMPTY if none; int32, 4 bytes per block
and head, like one summary channel), answers "which wanted blocks are here" with one gather
instead of comparing every wanted block with every slot.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kvtier.sparse.errors import WorkingSetMemoryError

EMPTY = -1


def allocate_slots(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed slot buffers; an out-of-memory on the device becomes WorkingSetMemoryError naming the
    bytes asked for (SparseKV adds the budget that sized them)."""
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except torch.OutOfMemoryError as e:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        raise WorkingSetMemoryError(f"out of memory on {device} allocating {nbytes} bytes of working-set "
                                    f"slots {tuple(shape)}: {e}") from e


class WorkingSet:
    def __init__(self, kv_heads: int, slots: int, block_tokens: int, head_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.kv_heads = kv_heads
        self.slots = slots
        self.block_tokens = block_tokens
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.k = allocate_slots((kv_heads, slots + 1, block_tokens, head_size), dtype, self.device)
        self.v = allocate_slots(tuple(self.k.shape), dtype, self.device)
        self._block_of = np.full((kv_heads, slots), EMPTY, dtype=np.int64)
        self._last_used = np.zeros((kv_heads, slots), dtype=np.int64)
        self._wanted_slots = np.zeros((kv_heads, slots), dtype=bool)  # slots holding the last ensure's blocks
        # inverse of _block_of, grown on demand; its last column stays EMPTY, so looking up EMPTY
        # (index -1) answers "not held" without masking the padding out first
        self._slot_of = np.full((kv_heads, 1), EMPTY, dtype=np.int32)
        self._heads = np.arange(kv_heads)
        self._token_offsets = np.arange(block_tokens)
        self.tail_len = 0
        self._clock = 0
        self.fetched_slices = 0  # (block, head) slices filled by `ensure`, summed over steps
        self.fetched_blocks = 0  # distinct blocks among them, per ensure, summed over steps

    @property
    def block_of(self) -> torch.Tensor:
        """[H, slots] block id held by each slot (EMPTY if none); shares memory with the bookkeeping."""
        return torch.from_numpy(self._block_of)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def byte_views(self) -> tuple[np.ndarray, np.ndarray]:
        """K and V buffers as uint8 arrays [H, slots + 1, B, d * itemsize] sharing their memory:
        `kb[h, s]` is slot s of head h, one C-contiguous buffer a store read can fill in place
        (uint8, since numpy has no bfloat16). Valid until `grow`."""
        return self.k.view(torch.uint8).numpy(), self.v.view(torch.uint8).numpy()

    def grow(self, slots: int) -> None:
        """Add slots (the dense reference policy's working set holds the whole context)."""
        if slots <= self.slots:
            return
        h, _, b, d = self.k.shape
        k = allocate_slots((h, slots + 1, b, d), self.k.dtype, self.device)
        v = allocate_slots((h, slots + 1, b, d), self.k.dtype, self.device)
        k[:, : self.slots] = self.k[:, : self.slots]
        v[:, : self.slots] = self.v[:, : self.slots]
        k[:, slots] = self.k[:, self.slots]
        v[:, slots] = self.v[:, self.slots]
        extra = slots - self.slots
        self._block_of = np.concatenate([self._block_of, np.full((h, extra), EMPTY, dtype=np.int64)], 1)
        self._last_used = np.concatenate([self._last_used, np.zeros((h, extra), dtype=np.int64)], 1)
        self._wanted_slots = np.concatenate([self._wanted_slots, np.zeros((h, extra), dtype=bool)], 1)
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
    def insert(self, block: int, k: torch.Tensor, v: torch.Tensor, protected: Callable[[np.ndarray], np.ndarray]) -> None:
        """Place a just-completed block ([H, B, d] each) in every head, evicting per head an empty
        slot, else the least recently used slot whose block is not `protected` (sinks, window)."""
        bo = self._block_of
        cost = self._last_used.copy()
        cost[protected(bo)] = np.iinfo(np.int64).max
        cost[bo == EMPTY] = -1
        self._fit_blocks(block + 1)
        held = self._slot_of[:, block]
        slot = np.where(held != EMPTY, held, cost.argmin(1))
        heads = self._heads
        ts = torch.from_numpy(slot).to(self.device)
        th = torch.from_numpy(heads).to(self.device)
        self._clear(heads, slot)
        self.k[th, ts] = k
        self.v[th, ts] = v
        self._place(heads, slot, np.full(self.kv_heads, block))
        self._clock += 1
        self._last_used[heads, slot] = self._clock

    def _fit_blocks(self, n: int) -> None:
        """Make _slot_of cover block ids < n (doubling, so a growing context reallocates rarely)."""
        have = self._slot_of.shape[1] - 1
        if n > have:
            grown = np.full((self.kv_heads, max(n, 2 * have, 64) + 1), EMPTY, dtype=np.int32)
            grown[:, :have] = self._slot_of[:, :have]
            self._slot_of = grown

    def holds(self, lo: int, hi: int) -> np.ndarray:
        """[H, hi - lo] bool: whether each head's working set holds blocks lo..hi-1 (held but not
        necessarily wanted by the last `ensure`)."""
        self._fit_blocks(hi)
        return self._slot_of[:, lo:hi] != EMPTY

    def _place(self, heads: np.ndarray, slots: np.ndarray, blocks: np.ndarray) -> None:
        """Record that slot slots[i] of head heads[i], `_clear`ed before its bytes were written, now
        holds blocks[i] (pairs distinct)."""
        self._block_of[heads, slots] = blocks
        self._slot_of[heads, blocks] = slots

    def _clear(self, heads: np.ndarray, slots: np.ndarray) -> None:
        """Mark slot slots[i] of head heads[i] empty (its bytes are about to be overwritten)."""
        old = self._block_of[heads, slots]
        gone = old != EMPTY
        self._slot_of[heads[gone], old[gone]] = EMPTY
        self._block_of[heads, slots] = EMPTY

    def ensure(self, wanted: np.ndarray | torch.Tensor,
               fill: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> int:
        """Make the working set hold wanted [H, m] (m <= slots, distinct per row, EMPTY = padding).

        `fill(heads, blocks, slots)` must write K and V of block blocks[i] of head heads[i] into
        slot slots[i] of head heads[i] (`byte_views`, or self.k / self.v), or raise; the pairs come
        sorted by head. Only the pairs a head lacks are asked for. Returns how many (block, head)
        slices were filled. Afterwards `token_mask()` marks the tokens of exactly these blocks.
        If `fill` raises, the slots it was to fill are left empty (never marked as holding a block
        whose bytes may not have arrived).
        """
        w = np.asarray(wanted)
        h, m = w.shape
        if m > self.slots:
            raise ValueError(f"{m} blocks wanted but the working set has {self.slots} slots")
        self._clock += 1
        if m:
            self._fit_blocks(int(w.max()) + 1)
        rows = self._heads[:, None]
        held = self._slot_of[rows, w]  # [H, m] slot of each wanted block, EMPTY if not held (or padding)
        have = held != EMPTY
        keep = np.zeros((h, self.slots + 1), dtype=bool)
        keep[rows, held] = True  # the misses mark the spare last column
        keep = keep[:, : self.slots]
        self._last_used[keep] = self._clock
        self._wanted_slots = keep
        need = ~have & (w != EMPTY)
        if not need.any():
            return 0
        need_heads, need_pos = need.nonzero()  # row-major: sorted by head
        need_blocks = w[need_heads, need_pos]
        # the r-th missing block of head h goes to the r-th free slot of head h
        need_rank = np.cumsum(need, 1)[need_heads, need_pos] - 1
        free = ~keep
        free_rank = np.cumsum(free, 1) - 1
        free_heads, free_slots = free.nonzero()
        slot_of_rank = np.full((h, self.slots), EMPTY, dtype=np.int64)
        slot_of_rank[free_heads, free_rank[free_heads, free_slots]] = free_slots
        dest = slot_of_rank[need_heads, need_rank]
        self._clear(need_heads, dest)
        fill(need_heads, need_blocks, dest)
        self._place(need_heads, dest, need_blocks)
        self._last_used[need_heads, dest] = self._clock
        keep[need_heads, dest] = True
        self.fetched_slices += len(need_heads)
        self.fetched_blocks += len(np.unique(need_blocks))
        return len(need_heads)

    def token_mask(self) -> torch.Tensor:
        """[H, (slots + 1) * B] bool: the tokens attention may read, i.e. those of the slots the last
        `ensure` wanted and the tail's filled part (a view of k and v flattened over slots)."""
        h, s, bt = self.kv_heads, self.slots, self.block_tokens
        valid = np.empty((h, s + 1, bt), dtype=bool)
        valid[:, :s] = self._wanted_slots[:, :, None]
        valid[:, s] = self._token_offsets < self.tail_len
        return torch.from_numpy(valid.reshape(h, -1)).to(self.device)

    def token_positions(self, tail_start: int) -> torch.Tensor:
        """[H, (slots + 1) * B] context position of every token of the buffers (the tail's block
        starts at `tail_start`); positions of EMPTY slots are negative."""
        starts = np.concatenate([self._block_of * self.block_tokens,
                                 np.full((self.kv_heads, 1), tail_start, dtype=np.int64)], 1)
        return torch.from_numpy((starts[:, :, None] + self._token_offsets).reshape(self.kv_heads, -1)).to(self.device)

    def write_slots(self, heads: np.ndarray, slots: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V [n, B, d] of n (head, slot) pairs into the buffers in one indexed copy each (a
        `fill` whose bytes came through a staging buffer, e.g. host -> GPU)."""
        th = torch.from_numpy(np.ascontiguousarray(heads)).to(self.device)
        ts = torch.from_numpy(np.ascontiguousarray(slots)).to(self.device)
        self.k[th, ts] = k.to(self.device, self.k.dtype, non_blocking=True)
        self.v[th, ts] = v.to(self.device, self.v.dtype, non_blocking=True)
