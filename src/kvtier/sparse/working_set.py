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
last `ensure` wanted) lives in small tensors on the working set's device, and `ensure` plans
a step with batched tensor ops over all heads at once (a gather finds the wanted blocks that
are held, a cumulative sum and a stable sort hand the r-th missing block of a head the r-th
free slot), so on an accelerator selection and planning never leave it. One small copy per
layer brings the plan to the host (`ensure`'s single device -> host transfer), because the
store, which the host addresses, must read the missing slices. `_slot_of` [H, blocks + 1]
(the slot holding each block, EMPTY if none; 8 bytes per block and head) answers "which
wanted blocks are here" with one gather instead of comparing every wanted block with every
slot. Every per-head table has one spare column past its last real entry: masked-off
entries of a batched scatter are pointed there, so a plan needs no compaction (nonzero,
which would sync the device) before it is applied.
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
        dev = self.device
        # [H, slots + 1]: the last column is the spare (never a real slot; see the module docstring)
        self._block_of = torch.full((kv_heads, slots + 1), EMPTY, dtype=torch.int64, device=dev)
        self._last_used = torch.zeros(kv_heads, slots + 1, dtype=torch.int64, device=dev)
        self._wanted_slots = torch.zeros(kv_heads, slots + 1, dtype=torch.bool, device=dev)
        # inverse of _block_of, grown on demand; its last column stays EMPTY, so looking up EMPTY
        # (index -1) answers "not held" without masking the padding out first
        self._slot_of = torch.full((kv_heads, 1), EMPTY, dtype=torch.int64, device=dev)
        self._heads = torch.arange(kv_heads, device=dev)
        self._token_offsets = torch.arange(block_tokens, device=dev)
        self.tail_len = 0
        self._clock = 0
        self.fetched_slices = 0  # (block, head) slices filled by `ensure`, summed over steps
        self.fetched_blocks = 0  # distinct blocks among them, per ensure, summed over steps
        self.also_missing = np.empty((kv_heads, 0), dtype=np.int64)  # see `ensure`

    @property
    def block_of(self) -> torch.Tensor:
        """[H, slots] block id held by each slot (EMPTY if none), on the device; a view of the bookkeeping."""
        return self._block_of[:, : self.slots]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def byte_views(self) -> tuple[np.ndarray, np.ndarray]:
        """K and V buffers as uint8 arrays [H, slots + 1, B, d * itemsize] sharing their memory:
        `kb[h, s]` is slot s of head h, one C-contiguous buffer a store read can fill in place
        (uint8, since numpy has no bfloat16). Valid until `grow`; host working sets only."""
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
        n = self.slots

        def widen(t: torch.Tensor, fill: int | bool) -> torch.Tensor:
            out = torch.full((h, slots + 1), fill, dtype=t.dtype, device=self.device)
            out[:, :n] = t[:, :n]
            return out

        self._block_of = widen(self._block_of, EMPTY)
        self._last_used = widen(self._last_used, 0)
        self._wanted_slots = widen(self._wanted_slots, False)
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
    def insert(self, block: int, k: torch.Tensor, v: torch.Tensor,
               protected: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Place a just-completed block ([H, B, d] each) in every head, evicting per head an empty
        slot, else the least recently used slot whose block is not `protected` (sinks, window)."""
        bo = self.block_of
        cost = self._last_used[:, : self.slots].clone()
        cost.masked_fill_(protected(bo), torch.iinfo(torch.int64).max)
        cost.masked_fill_(bo == EMPTY, -1)
        self._fit_blocks(block + 1)
        held = self._slot_of[:, block]
        slot = torch.where(held != EMPTY, held, cost.argmin(1))
        everyone = torch.ones(self.kv_heads, dtype=torch.bool, device=self.device)
        self._clear(slot[:, None], everyone[:, None])
        self.k[self._heads, slot] = k
        self.v[self._heads, slot] = v
        self._place(slot[:, None], torch.full((self.kv_heads, 1), block, device=self.device), everyone[:, None])
        self._clock += 1
        self._last_used[self._heads, slot] = self._clock

    def _fit_blocks(self, n: int) -> None:
        """Make _slot_of cover block ids < n (doubling, so a growing context reallocates rarely)."""
        have = self._slot_of.shape[1] - 1
        if n > have:
            grown = torch.full((self.kv_heads, max(n, 2 * have, 64) + 1), EMPTY, dtype=torch.int64, device=self.device)
            grown[:, :have] = self._slot_of[:, :have]
            self._slot_of = grown

    def holds(self, lo: int, hi: int) -> torch.Tensor:
        """[H, hi - lo] bool on the device: whether each head's working set holds blocks lo..hi-1
        (held but not necessarily wanted by the last `ensure`)."""
        self._fit_blocks(hi)
        return self._slot_of[:, lo:hi] != EMPTY

    def _place(self, slots: torch.Tensor, blocks: torch.Tensor, on: torch.Tensor) -> None:
        """Where `on` [H, m]: record that slot slots[h, j] of head h, `_clear`ed before its bytes were
        written, now holds blocks[h, j] (distinct per head). Entries off `on` touch only spare columns."""
        spare_slot = torch.where(on, slots, self.slots)
        self._block_of.scatter_(1, spare_slot, torch.where(on, blocks, EMPTY))
        spare_block = torch.where(on, blocks, self._slot_of.shape[1] - 1)
        self._slot_of.scatter_(1, spare_block, torch.where(on, slots, EMPTY))

    def _clear(self, slots: torch.Tensor, on: torch.Tensor) -> None:
        """Where `on` [H, m]: mark slot slots[h, j] of head h empty (its bytes are about to be overwritten)."""
        spare_slot = torch.where(on, slots, self.slots)
        old = self._block_of.gather(1, spare_slot)
        gone = on & (old != EMPTY)
        self._slot_of.scatter_(1, torch.where(gone, old, self._slot_of.shape[1] - 1),
                               torch.full_like(old, EMPTY))
        self._block_of.scatter_(1, spare_slot, torch.full_like(old, EMPTY))

    def ensure(self, wanted: np.ndarray | torch.Tensor,
               fill: Callable[[np.ndarray, np.ndarray, np.ndarray], None], n_blocks: int | None = None,
               also: torch.Tensor | None = None) -> int:
        """Make the working set hold wanted [H, m] (m <= slots, distinct per row, EMPTY = padding).

        `fill(heads, blocks, slots)` must write K and V of block blocks[i] of head heads[i] into
        slot slots[i] of head heads[i] (`byte_views`, or self.k / self.v), or raise; the pairs come
        sorted by head, as host arrays. Only the pairs a head lacks are asked for. Returns how many
        (block, head) slices were filled. Afterwards `token_mask()` marks the tokens of exactly these
        blocks. If `fill` raises, the slots it was to fill are left empty (never marked as holding a
        block whose bytes may not have arrived).

        The plan is made on the device, all heads at once; its one transfer to the host is the
        [3, H, m] (need, block, slot) table `fill` is called with. `n_blocks` bounds the block ids
        (the context's blocks; without it the largest wanted id is read, a device sync off the CPU).
        `also` [H, p] (blocks a prefetch may want next, not in `wanted`) rides along in the same copy:
        afterwards `also_missing` [H, p] (host) holds those of them this working set did not hold
        before the step, EMPTY elsewhere.
        """
        w = torch.as_tensor(wanted).to(self.device, torch.int64)
        h, m = w.shape
        if m > self.slots:
            raise ValueError(f"{m} blocks wanted but the working set has {self.slots} slots")
        self._clock += 1
        self.also_missing = np.empty((h, 0), dtype=np.int64)
        if m == 0:
            self._wanted_slots.zero_()
            return 0
        self._fit_blocks(int(w.max()) + 1 if n_blocks is None else n_blocks)
        padding = w == EMPTY
        held = self._slot_of.gather(1, torch.where(padding, self._slot_of.shape[1] - 1, w))  # [H, m], EMPTY if not held
        have = held != EMPTY
        keep = torch.zeros(h, self.slots + 1, dtype=torch.bool, device=self.device)
        keep.scatter_(1, torch.where(have, held, self.slots), True)  # the misses mark the spare column
        keep[:, self.slots] = False
        self._last_used.masked_fill_(keep, self._clock)
        need = ~have & ~padding  # [H, m]
        # the r-th missing block of head h goes to the r-th free slot of head h (slots in index order)
        free_first = torch.argsort(keep[:, : self.slots].to(torch.int8), dim=1, stable=True)
        rank = (torch.cumsum(need, 1) - 1).clamp(min=0)
        dest = torch.where(need, free_first.gather(1, rank), self.slots)
        table = torch.stack((need.to(torch.int64), w, dest)).view(3 * h, m)
        if also is not None and also.shape[1]:
            a = also.to(self.device, torch.int64)
            self._fit_blocks(n_blocks if n_blocks is not None else int(a.max()) + 1)
            a_held = self._slot_of.gather(1, torch.where(a == EMPTY, self._slot_of.shape[1] - 1, a)) != EMPTY
            packed = torch.cat((table.reshape(-1), torch.where(a_held, EMPTY, a).reshape(-1))).cpu().numpy()
            plan = packed[: 3 * h * m].reshape(3, h, m)  # the one device -> host copy
            self.also_missing = packed[3 * h * m :].reshape(h, -1)
        else:
            plan = table.cpu().numpy().reshape(3, h, m)  # the one device -> host copy
        need_heads, need_pos = plan[0].nonzero()  # row-major: sorted by head
        self._wanted_slots = keep
        if not len(need_heads):
            return 0
        need_blocks = plan[1][need_heads, need_pos]
        dest_slots = plan[2][need_heads, need_pos]
        self._clear(dest, need)
        fill(need_heads, need_blocks, dest_slots)
        self._place(dest, w, need)
        self._last_used.scatter_(1, dest, torch.where(need, self._clock, self._last_used.gather(1, dest)))
        keep = keep.scatter(1, dest, need | keep.gather(1, dest))
        keep[:, self.slots] = False
        self._wanted_slots = keep
        self.fetched_slices += len(need_heads)
        self.fetched_blocks += len(np.unique(need_blocks))
        return len(need_heads)

    def token_mask(self) -> torch.Tensor:
        """[H, (slots + 1) * B] bool: the tokens attention may read, i.e. those of the slots the last
        `ensure` wanted and the tail's filled part (a view of k and v flattened over slots)."""
        h, s, bt = self.kv_heads, self.slots, self.block_tokens
        valid = torch.empty(h, s + 1, bt, dtype=torch.bool, device=self.device)
        valid[:, :s] = self._wanted_slots[:, :s, None]
        valid[:, s] = self._token_offsets < self.tail_len
        return valid.reshape(h, -1)

    def token_positions(self, tail_start: int) -> torch.Tensor:
        """[H, (slots + 1) * B] context position of every token of the buffers (the tail's block
        starts at `tail_start`); positions of EMPTY slots are negative."""
        starts = self._block_of * self.block_tokens
        starts[:, self.slots] = tail_start
        return (starts[:, :, None] + self._token_offsets).reshape(self.kv_heads, -1)

    def write_slots(self, heads: np.ndarray, slots: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V [n, B, d] of n (head, slot) pairs into the buffers in one indexed copy each (a
        `fill` whose bytes came through a staging buffer, e.g. host -> GPU).

        The pairs index the buffers viewed as [H * (slots + 1), B, d] (one index, one transfer of it):
        index_copy_ moves whole slots, where an index_put over (head, slot) pairs costs per element
        (on the CPU, ~4x the time for a decode step's slices)."""
        (rows,) = host_indices_to(self.device, np.asarray(heads, dtype=np.int64) * (self.slots + 1) + slots)
        bt, d = self.k.shape[2:]
        self.k.view(-1, bt, d).index_copy_(0, rows, k.to(self.device, self.k.dtype, non_blocking=True))
        self.v.view(-1, bt, d).index_copy_(0, rows, v.to(self.device, self.v.dtype, non_blocking=True))


def host_indices_to(device: torch.device, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Host int arrays as int64 tensors on `device`, in one copy. On CUDA the copy is from page-locked
    memory: a copy from pageable memory first waits for everything queued on the stream (a hidden
    device sync per call, several per layer and decode step); pinned, it is queued like a kernel."""
    n = len(arrays[0])
    packed = torch.from_numpy(np.stack([np.asarray(a, dtype=np.int64) for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory()
    on = packed.to(device, non_blocking=True)
    return tuple(on[i, :n] for i in range(len(arrays)))
