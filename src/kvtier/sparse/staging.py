"""HostStaging: one reusable host buffer that store reads land in before one batched copy to the device.

Who calls: SparseKV (`_fill`, decode's newly selected (block, KV head) slices) when its working
sets live on an accelerator. The store reads into host memory; copying each slice to the GPU on
its own would be one small transfer per slice, so they are read into consecutive rows of this
buffer and moved by a single host -> device copy per layer and step.

On CUDA the buffer is page-locked (a non_blocking copy from pageable memory is synchronous) and
the copy runs on a side stream; the compute stream waits for it by event before attention reads
the slots, and the next `rows()` waits for the previous copy before the buffer is overwritten.
On the CPU (tests, CPU decode) the same code runs with a pageable buffer and plain copies.
"""

from __future__ import annotations

import torch


class HostStaging:
    def __init__(self, row_shape: tuple[int, ...], device: torch.device) -> None:
        self.row_shape = row_shape
        self.device = device
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._buf = torch.empty(0, *row_shape, dtype=torch.uint8)
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._copied: torch.cuda.Event | None = None

    def rows(self, n: int) -> torch.Tensor:
        """The first n rows [n, *row_shape] uint8 of the buffer (grown, never shrunk), free to write:
        waits for the previous copy out of it."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self._buf.shape[0] < n:
            cap = max(n, 2 * self._buf.shape[0])
            self._buf = torch.empty(cap, *self.row_shape, dtype=torch.uint8, pin_memory=self._cuda)
        return self._buf[:n]

    @property
    def pinned(self) -> bool:
        return bool(self._buf.is_pinned()) if self._buf.numel() else self._cuda

    def to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (a view of the buffer) on the device: on CUDA a non_blocking copy on the side
        stream that the current stream waits for; elsewhere a plain copy (or the rows themselves)."""
        if not self._cuda:
            return rows.to(self.device)
        assert self._stream is not None
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)  # the slots being overwritten are no longer read
        with torch.cuda.stream(self._stream):
            out = rows.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        main.wait_stream(self._stream)
        out.record_stream(main)
        return out
