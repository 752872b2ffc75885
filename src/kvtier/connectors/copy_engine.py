"""Host <-> accelerator copies for the connectors: devices, page-locked staging, copy streams.

    model_device(model)               the one device a model's weights live on (clear error otherwise)
    choose_device()                   "cuda" when a GPU is present, else "cpu" (for the demo and benches)
    synchronize(device)               wait for the device's queued work (no-op on the CPU)
    staging_buffer(nbytes, device)    a uint8 host buffer, page-locked when the KV lives on CUDA
    host_to_device_probe(device)      bytes, seconds of one pinned host -> device copy (None off CUDA)
    StagingPool(device)               one reusable (pinned on CUDA) host buffer: pinning costs more than copying
    shared_pools(device)              the process's (load pool, save pool, SaveCopies) for a device
    LayerCopies(device, stream)       per-layer host -> device copies on a side stream, one event each
                                      (gather: a group of layers straight out of a page-locked pool)
    pool_runs(starts, span)           (first row, pool offset, rows) runs of rows read out of a pool:
                                      neighbouring slots are one copy
    SaveCopies(device)                device -> host copies of saves on another stream; what follows a copy
                                      (writing it to the store, publishing) runs once it completes, on a
                                      worker thread, so the forward never waits for a save
                                      (to_pool: straight into a page-locked pool's reserved slots)
    SideStream(device)                batched gathers/scatters on a side stream, an event per batch
                                      (the vLLM GPU adapters: one per layer), waited on by the compute stream
    HostRegistry, host_registry()     page-locked host ranges (cudaHostRegister), registered once each
    page_lock_pool(owner, device)     page-lock a store's or service client's DRAM pool when the KV is on
                                      CUDA (unregistered when the owner closes); skipped off CUDA

The CUDA-only parts are a few lines behind `device.type == "cuda"`; the same code runs on CPU
tensors synchronously (no stream, an event that is always complete), so the logic around it is
tested on any machine. A page-locked allocation the OS refuses (RLIMIT_MEMLOCK, no driver) falls
back to pageable memory with one logged warning: slower copies, never a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvtier.sparse.errors import UnsupportedModelError

log = logging.getLogger(__name__)

PROBE_BYTES = 64 << 20
DIRECT_GROUP_BYTES = 4 << 20  # direct loads and saves: layers per copy group so that one chunk's piece is about this big
VERIFY_JOB_BYTES = 64 << 20  # direct loads: bytes checked per job on the store's verify threads
_warned: set[str] = set()
_warned_lock = threading.Lock()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of every weight of `model`; UnsupportedModelError when they are spread over several."""
    devices = {p.device for p in model.parameters()}
    if not devices:
        return torch.device("cpu")
    if len(devices) > 1:
        shown = ", ".join(sorted(str(d) for d in devices))
        raise UnsupportedModelError(f"the model's weights are on several devices ({shown}); kvtier's transformers "
                                    "cache keeps each layer's KV on one device: load the model on one device")
    return devices.pop()


def same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" names the current GPU: equal to "cuda:0" when that is the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def choose_device() -> str:
    """Where to run a model kvtier builds itself (demo, benchmarks): the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warn_once(kind: str, msg: str, *args: Any) -> None:
    with _warned_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    log.warning(msg, *args)


def staging_buffer(nbytes: int, device: torch.device | str,
                   allocate: Callable[..., torch.Tensor] = torch.empty) -> tuple[torch.Tensor, bool]:
    """(a uint8 host tensor of `nbytes`, whether it is page-locked). Pinned only when `device` is CUDA
    (a host -> GPU copy from pinned memory is asynchronous and several times faster); a refused pin
    falls back to pageable memory with one warning."""
    if torch.device(device).type != "cuda":
        return allocate(nbytes, dtype=torch.uint8), False
    try:
        return allocate(nbytes, dtype=torch.uint8, pin_memory=True), True
    except RuntimeError as e:
        _warn_once("pin", "kvtier: page-locked host memory was refused (%s); copying through pageable memory, "
                   "which is slower. Raise the locked-memory limit (ulimit -l) to fix this.", e)
        return allocate(nbytes, dtype=torch.uint8), False


def host_to_device_probe(device: torch.device | str, nbytes: int = PROBE_BYTES) -> tuple[int, float] | None:
    """Best of 3 copies of one pinned host tensor to `device` (None unless CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src, _ = staging_buffer(nbytes, device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes, max(best, 1e-9)


class StagingPool:
    """One grow-only host buffer, reused by one prefill at a time. On CUDA it is page-locked, and
    allocating pinned memory costs far more than the copies it speeds up, so it is kept; a prefill
    that finds it taken gets a buffer of its own. `release(buf, event)` hands it back once `event`
    (the last copy out of it) completes: the next `acquire` waits for that event."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buf: torch.Tensor | None = None
        self._busy = False
        self._pending: Any = None
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._busy:
                return staging_buffer(nbytes, self.device)[0]
            if self._pending is not None:
                self._pending.synchronize()
                self._pending = None
            if self._buf is None or self._buf.numel() < nbytes:
                self._buf = None
                self._buf = staging_buffer(nbytes, self.device)[0]
            self._busy = True
            return self._buf[:nbytes]

    def release(self, buf: torch.Tensor, event: Any = None) -> None:
        with self._lock:
            if self._buf is not None and buf.numel() and buf.data_ptr() == self._buf.data_ptr():
                self._busy = False
                self._pending = event


class DoneEvent:
    """What a CPU copy records: it is complete when recorded."""

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


def pool_runs(starts: Sequence[tuple[int, int]], span: int) -> list[list[int]]:
    """[first row, pool offset, rows] runs for rows read out of a pool: `starts` are (row, pool offset
    of the row's `span` bytes) in row order; a row that follows the last run in both row and offset
    extends it, so neighbouring slots move as one copy rather than one per row."""
    runs: list[list[int]] = []
    for row, off in starts:
        if runs and runs[-1][0] + runs[-1][2] == row and runs[-1][1] + runs[-1][2] * span == off:
            runs[-1][2] += 1
        else:
            runs.append([row, off, 1])
    return runs


class LayerCopies:
    """Per-layer host -> device copies: `copy(layer, src)` queues the copy of one layer's staged bytes
    on a side stream and records that layer's event; `ready(layer)` makes the compute stream wait for
    that event only (no CPU wait), so layer i's copy overlaps the compute of the layers before it.
    On a CPU device copies run at once and events are always complete: the same calls, no stream.
    A copy that raises marks its layer failed (`failed(layer)`); the caller then recomputes the
    chunks instead of reading a half-written buffer."""

    def __init__(self, device: torch.device | str, stream: Any = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = (stream or torch.cuda.Stream(self.device)) if self.cuda else None
        self._events: dict[int, Any] = {}
        self._failed: dict[int, str] = {}
        self.last_event: Any = None  # the latest copy's event: its source buffer is free once it completes

    def copy(self, layer: int, src: torch.Tensor) -> torch.Tensor | None:
        """The device copy of `src` (None when the copy failed; see failed())."""
        try:
            if self._stream is None:
                out = src.to(self.device)
                self._events[layer] = self.last_event = DoneEvent()
                return out
            with torch.cuda.stream(self._stream):
                out = src.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            out.record_stream(torch.cuda.current_stream(self.device))  # freed only after compute used it
            self._events[layer] = self.last_event = event
            return out
        except RuntimeError as e:  # a CUDA error (or out of memory) while queueing the copy
            self._failed[layer] = f"{type(e).__name__}: {e}"
            return None

    def gather(self, layers: Sequence[int], pieces: Sequence[tuple[int, torch.Tensor]], rows: int,
               row_bytes: int) -> torch.Tensor | None:
        """One device buffer uint8 [rows, row_bytes] filled from host pieces (first row, uint8 host
        tensor covering whole rows from there), as one event shared by `layers`: the copies of a
        group of layers straight out of a page-locked pool. Rows no piece covers are left unwritten.
        None when queueing failed (see failed())."""
        try:
            if self._stream is None:
                out = torch.empty((rows, row_bytes), dtype=torch.uint8, device=self.device)
                flat = out.view(-1)
                for row, src in pieces:
                    flat[row * row_bytes:row * row_bytes + src.numel()].copy_(src)
                event: Any = DoneEvent()
            else:
                with torch.cuda.stream(self._stream):
                    out = torch.empty((rows, row_bytes), dtype=torch.uint8, device=self.device)
                    flat = out.view(-1)
                    for row, src in pieces:
                        flat[row * row_bytes:row * row_bytes + src.numel()].copy_(src, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                out.record_stream(torch.cuda.current_stream(self.device))  # freed only after compute used it
            for layer in layers:
                self._events[layer] = event
            self.last_event = event
            return out
        except RuntimeError as e:  # a CUDA error (or out of memory) while queueing the copies
            for layer in layers:
                self._failed[layer] = f"{type(e).__name__}: {e}"
            return None

    def ready(self, layer: int) -> None:
        """Make the current stream wait for `layer`'s copy (returns at once; the GPU waits)."""
        event = self._events.get(layer)
        if event is not None and self.cuda:
            torch.cuda.current_stream(self.device).wait_event(event)

    def failed(self, layer: int) -> str | None:
        return self._failed.get(layer)


class SaveCopies:
    """Device -> host copies of what a forward saves, and the work that must follow each copy.

    `to_host(t)` returns (host tensor, event): on CUDA a pinned buffer filled on the save stream
    after the compute stream's work so far (the layer just computed), on the CPU `t` itself and an
    event that is complete. `then(event, fn)` runs fn once event completes: at once in the calling
    thread when not threaded (the CPU default), else in FIFO order on one worker thread, so the
    forward never waits for a save and saves still publish in order. An fn that raises calls
    `on_error(exc)` (given with it) and the queue goes on; `drain()` waits for everything queued."""

    def __init__(self, device: torch.device | str, threaded: bool | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threaded = self.cuda if threaded is None else threaded
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._queue: Any = None
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def to_host(self, t: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        if not t.is_cuda:
            return t, DoneEvent()
        host = out if out is not None else staging_buffer(t.numel() * t.element_size(), self.device)[0]
        host = host.view(t.dtype).view(t.shape)
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        t.record_stream(self._stream)  # the device tensor is not reused before the copy is done
        return host, event

    def to_pool(self, src: torch.Tensor, pieces: Sequence[tuple[int, torch.Tensor]]) -> Any:
        """Copy rows of `src` (uint8 [rows, row_bytes] where the KV lives) straight into host tensors,
        one copy per piece (first row, uint8 host tensor covering whole rows from there: a run of a
        store's page-locked DRAM slots); the event of them all. On CUDA on the save stream after the
        compute stream's work so far (the layer just computed), on the CPU at once (a complete event).
        The save side of LayerCopies.gather. When queueing fails, the copies already queued are waited
        for before the error is raised, so none still writes into a slot its caller then gives back."""
        flat = src.reshape(-1)
        row_bytes = src.shape[1]
        if not src.is_cuda:
            for row, dst in pieces:
                dst.copy_(flat[row * row_bytes:row * row_bytes + dst.numel()])
            return DoneEvent()
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self._stream):
                for row, dst in pieces:
                    dst.copy_(flat[row * row_bytes:row * row_bytes + dst.numel()], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        except RuntimeError:
            try:
                self._stream.synchronize()
            except RuntimeError:  # a CUDA error: the stream runs nothing more
                pass
            raise
        src.record_stream(self._stream)  # the device buffer is not reused before its copies are done
        return event

    def then(self, event: Any, fn: Callable[[], None], on_error: Callable[[BaseException], None]) -> None:
        if not self.threaded:
            self._run(event, fn, on_error)
            return
        with self._lock:
            if self._worker is None:
                import queue

                self._queue = queue.SimpleQueue()
                self._worker = threading.Thread(target=self._loop, name="kvtier-save-copies", daemon=True)
                self._worker.start()
        self._queue.put((event, fn, on_error))

    def drain(self) -> None:
        if self._worker is None:
            return
        done = threading.Event()
        self._queue.put((DoneEvent(), done.set, lambda e: done.set()))
        done.wait()

    @staticmethod
    def _run(event: Any, fn: Callable[[], None], on_error: Callable[[BaseException], None]) -> None:
        try:
            event.synchronize()
            fn()
        except Exception as e:  # noqa: BLE001 - reaches the connector through on_error (counted, logged once)
            on_error(e)

    def _loop(self) -> None:
        while True:
            event, fn, on_error = self._queue.get()
            self._run(event, fn, on_error)


_shared: dict[str, tuple[StagingPool, StagingPool, SaveCopies]] = {}
_shared_lock = threading.Lock()


def shared_pools(device: torch.device | str) -> tuple[StagingPool, StagingPool, SaveCopies]:
    """(load staging pool, save staging pool, SaveCopies) shared by every connector on `device` in
    this process. Page-locked memory and copy threads belong to the process, not to one store:
    a connector rebuilt on a reopened store must not pin gigabytes again or start another thread."""
    key = str(torch.device(device))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = (StagingPool(device), StagingPool(device), SaveCopies(device))
        return _shared[key]


# -- page-locking the store's DRAM pool ------------------------------------------------------------
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def _cuda_host_register(address: int, nbytes: int) -> str | None:
    """cudaHostRegister through torch's cudart bindings; None on success, else the error's name."""
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_PORTABLE)
    return None if int(err) == 0 else str(err)


def _cuda_host_unregister(address: int) -> str | None:
    err = torch.cuda.cudart().cudaHostUnregister(address)
    return None if int(err) == 0 else str(err)


class HostRegistry:
    """Page-locked host ranges of this process, each registered once with CUDA however many stores
    or connectors announce it, and unregistered when the last of them says it is going.

    It is a PoolWatcher (tiers/pool.py): `mapped(region)` registers, `unmapped(region)` releases.
    A range overlapping a different registered range, or one CUDA refuses (RLIMIT_MEMLOCK, no
    driver), stays pageable: copies from it are slower and synchronous, logged once, never a
    crash. `register`/`unregister` are injectable so the bookkeeping is tested without a GPU."""

    def __init__(self, register: Callable[[int, int], str | None] = _cuda_host_register,
                 unregister: Callable[[int], str | None] = _cuda_host_unregister) -> None:
        self._register = register
        self._unregister = unregister
        self._ranges: dict[tuple[int, int], int] = {}  # (address, nbytes) -> announcements
        self._lock = threading.Lock()

    def mapped(self, region: Any) -> None:
        self.acquire(region.address, region.nbytes)

    def unmapped(self, region: Any) -> None:
        self.release(region.address, region.nbytes)

    def acquire(self, address: int, nbytes: int) -> bool:
        """Page-lock [address, address + nbytes) unless it is already; whether it is page-locked."""
        if address <= 0 or nbytes <= 0:
            raise ValueError(f"host range at {address:#x} of {nbytes} bytes: both must be positive")
        key = (address, nbytes)
        with self._lock:
            if key in self._ranges:
                self._ranges[key] += 1
                return True
            end = address + nbytes
            clash = next(((a, n) for a, n in self._ranges if a < end and address < a + n), None)
            if clash is not None:
                _warn_once("overlap", "kvtier: host range %#x+%d overlaps the page-locked range %#x+%d; "
                           "it stays pageable", address, nbytes, *clash)
                return False
            err = self._register(address, nbytes)
            if err is not None:
                _warn_once("register", "kvtier: page-locking the DRAM pool (%d bytes) was refused (%s); "
                           "copies to the GPU go through pageable memory, which is slower. Raise the "
                           "locked-memory limit (ulimit -l) to fix this.", nbytes, err)
                return False
            self._ranges[key] = 1
            return True

    def release(self, address: int, nbytes: int) -> None:
        """One announcement of the range is gone; unregistered with the last. Unknown ranges (never
        registered, refused) are ignored: their owners do not know whether registration worked."""
        key = (address, nbytes)
        with self._lock:
            count = self._ranges.get(key)
            if count is None:
                return
            if count > 1:
                self._ranges[key] = count - 1
                return
            del self._ranges[key]
            err = self._unregister(address)
        if err is not None:
            log.warning("kvtier: unregistering page-locked host range %#x+%d failed: %s", address, nbytes, err)

    def registered(self) -> dict[tuple[int, int], int]:
        """(address, nbytes) -> how many owners announced it."""
        with self._lock:
            return dict(self._ranges)


_host_registry: HostRegistry | None = None


def host_registry() -> HostRegistry:
    """The process's registry: page-locked memory belongs to the process, like shared_pools."""
    global _host_registry
    with _shared_lock:
        if _host_registry is None:
            _host_registry = HostRegistry()
        return _host_registry


def page_lock_pool(owner: Any, device: torch.device | str, registry: HostRegistry | None = None) -> bool:
    """Page-lock the DRAM pool of `owner` (a StoreClient or TieredStore: anything with watch_pool)
    when the KV lives on a CUDA device, so host <-> GPU copies out of its slots are asynchronous and
    at full speed; it is unregistered when the owner closes (or a service client's session goes).
    Whether a registration was asked for: False off CUDA (nothing to do) or without watch_pool."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    watch = getattr(owner, "watch_pool", None)
    if watch is None:
        return False
    watch(registry if registry is not None else host_registry())
    return True


class SideStream:
    """Copies and index ops queued on a side stream of `device`, each batch with an event.

    `run(fn, after_compute)` runs fn with the side stream current (after the compute stream's work
    so far when after_compute: a save of the layer just computed), records an event and returns
    (fn's result, event). `wait(event)` makes the compute stream wait for it (no CPU wait);
    `join()` makes it wait for everything queued. Tensors fn allocates belong to the side stream,
    so they are reused only by later side-stream work. On the CPU fn runs at once and the event is
    complete: the same calls, so the logic around them is tested on any machine."""

    def __init__(self, device: torch.device | str, stream: Any = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = (stream or torch.cuda.Stream(self.device)) if self.cuda else None

    def run(self, fn: Callable[[], Any], after_compute: bool = False) -> tuple[Any, Any]:
        if self._stream is None:
            return fn(), DoneEvent()
        if after_compute:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            out = fn()
            event = torch.cuda.Event()
            event.record(self._stream)
        return out, event

    def wait(self, event: Any) -> None:
        if self._stream is not None and not isinstance(event, DoneEvent):
            torch.cuda.current_stream(self.device).wait_event(event)

    def join(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
