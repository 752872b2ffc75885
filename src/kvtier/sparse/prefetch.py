"""Prefetcher: (block, KV head) slices a layer will likely want next step, read ahead beside compute.

Who calls: SparseKV. After a layer's selection (`_select`), the blocks ranked just below its picks
(`sparse.prefetch_blocks` per head, those the working set does not hold) are the likeliest to
enter the next step's picks as the query drifts. `start(layer, heads, blocks)` reads them from
the store on a worker thread (into host rows of its own) and, on CUDA, copies them to the device
on a side stream with an event, while the rest of this step and the next step's earlier layers
compute. At the next step's `_fill` of that layer, `take(layer)` hands back what was read ahead:
the slices the new plan needs and the prefetch holds are copied from it (device to device), the
rest are read from the store as without prefetch. A prefetch is used once and then dropped.

Each prefetched slice is the verified store content of exactly that (layer, head, block); blocks
are immutable once written, so a wrong guess costs only the bytes read, never the output. A
failed read ahead (say, a block missing from every tier) is dropped: the plan's own read of the
block, if it needs it, raises as without prefetch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class Prefetched:
    """Slices read ahead for one layer: pair i = (heads[i], blocks[i]); rows [n, 2, B, d] (K, V) on
    the working set's device, ready once `ready` (a CUDA event, or None) has been waited for."""

    heads: np.ndarray
    blocks: np.ndarray
    rows: torch.Tensor
    ready: torch.cuda.Event | None

    def lookup(self, heads: np.ndarray, blocks: np.ndarray, n_blocks: int) -> np.ndarray:
        """For each wanted pair, its row here, or -1."""
        have = self.heads * n_blocks + self.blocks
        want = heads * n_blocks + blocks
        order = np.argsort(have, kind="stable")
        pos = np.searchsorted(have[order], want)
        pos = np.minimum(pos, len(have) - 1)
        found = have[order][pos] == want
        return np.where(found, order[pos], -1)


class Prefetcher:
    def __init__(self, device: torch.device,
                 read: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None],
                 row_bytes: int) -> None:
        """`read(layer, heads, blocks, out)` is SparseKV's verified batched store read (row i of
        out [n, 2, row_bytes] uint8 = K and V of pair i); `row_bytes` the bytes of one head's K (or V)
        of a block."""
        self.device = device
        self._read = read
        self._row_bytes = row_bytes
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future[Prefetched | None]] = {}
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self.prefetched_slices = 0  # read ahead
        self.used_slices = 0  # of them, filled into a working set instead of a store read

    def start(self, layer: int, heads: np.ndarray, blocks: np.ndarray, dtype: torch.dtype,
              row_shape: tuple[int, int]) -> None:
        """Read (heads[i], blocks[i]) of `layer` ahead on the worker thread (replacing an unused one)."""
        self.drop(layer)
        if not len(heads):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-sparse-prefetch")
        self._pending[layer] = self._pool.submit(self._fetch, layer, heads.copy(), blocks.copy(), dtype, row_shape)

    def _fetch(self, layer: int, heads: np.ndarray, blocks: np.ndarray, dtype: torch.dtype,
               row_shape: tuple[int, int]) -> Prefetched | None:
        n = len(heads)
        host = torch.empty(n, 2, self._row_bytes, dtype=torch.uint8, pin_memory=self._cuda)
        arr = host.numpy()
        try:
            self._read(layer, heads, blocks, arr)
        except Exception:  # a guess that cannot be read is dropped; the plan's own read reports it
            return None
        rows = host.view(dtype).view(n, 2, *row_shape)
        ready = None
        if self._cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                rows = rows.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
        self.prefetched_slices += n
        return Prefetched(heads, blocks, rows, ready)

    def take(self, layer: int) -> Prefetched | None:
        """What was read ahead for `layer` (waited for; None if nothing or it failed), then forgotten."""
        fut = self._pending.pop(layer, None)
        if fut is None:
            return None
        got = fut.result()
        if got is not None and got.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(got.ready)
            got.rows.record_stream(torch.cuda.current_stream(self.device))
        return got

    def drop(self, layer: int) -> None:
        fut = self._pending.pop(layer, None)
        if fut is not None:
            fut.result()  # its buffers are not reused, but let it finish before the next one starts

    def close(self) -> None:
        for layer in list(self._pending):
            self.drop(layer)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
