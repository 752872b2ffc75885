"""BackgroundWriter: a span's blocks and summaries go to the store while later prefill chunks compute.

Who calls: SparseKV (`append` -> `_save_layer`), one writer per request, from the forward's
thread. `submit(job)` queues one layer's save (device -> host copy, the per-(head, plane) section
writes, the summaries' encoding, and after the last layer the commit) and returns at once; jobs
run in order on one worker thread, so a span's layers reach the store's SaveBatch in layer order.

    submit(job, nbytes)  queue a job; blocks while `max_pending` jobs wait, or while the jobs waiting
                    hold `max_bytes` (each holds one layer's new KV, on the GPU until its copy: a
                    prefill's 16k-token chunks would otherwise queue gigabytes of it); one job is always
                    let in; raises the first failed job's error (SparseWriteError)
    pending         jobs queued or running
    drain()         wait until every queued job ran; raises SparseWriteError if one failed
    close()         drain, then let the worker end; the writer is unusable after
    abandon()       skip the queued jobs not started, wait for the one running, close; returns the
                    error of a failed job no caller was told of (the owner dropping its request logs it)

A failed job is never dropped silently: its error is kept and raised by every later submit,
drain and close (the blocks it was to write are not in the store, and a read of them would
raise BlockMissingError anyway; this says why). The worker thread starts on the first job and
ends when the queue runs dry, so an idle request holds no thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from kvtier.sparse.errors import SparseWriteError


class BackgroundWriter:
    def __init__(self, max_pending: int = 8, name: str = "kvtier-sparse-writer", max_bytes: int | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None: no bound), got {max_bytes}")
        self._queue: queue.Queue[tuple[Callable[[], None], int]] = queue.Queue(maxsize=max_pending)
        self.max_bytes = max_bytes
        self._bytes = 0  # what the queued and running jobs hold
        self._room = threading.Condition()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_raised = False  # a caller was told of _error (abandon returns it otherwise)
        self._abandoned = False  # the worker skips every job it takes
        self._closed = False
        self._name = name

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        self._raise_failed()
        if self._closed:
            raise RuntimeError("submit to a closed BackgroundWriter")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._room:  # jobs ahead of this one hold a worker running, so the wait ends
            while self.max_bytes is not None and self._bytes and self._bytes + nbytes > self.max_bytes:
                self._room.wait()
            self._bytes += nbytes
        self._queue.put((job, nbytes))  # blocks while the queue is full
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def drain(self) -> None:
        self._queue.join()
        self._raise_failed()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._closed = True

    def abandon(self) -> BaseException | None:
        """Skip every queued job that has not started and wait for the one running: no job runs after
        this returns. The writer is closed after. For an owner dropping its request (its writes are of
        no use to anyone), who must then release what the skipped jobs would have (a save begun by an
        earlier job and never committed). Returns the error of a failed job that no submit, drain or
        close raised, or None; never raises it."""
        self._abandoned = True
        try:
            self._queue.join()
        finally:
            self._closed = True
        return None if self._error_raised else self._error

    def _raise_failed(self) -> None:
        if self._error is not None:
            self._error_raised = True
            raise SparseWriteError(f"a background write of sparse KV to the store failed: {self._error!r}") \
                from self._error

    def _run(self) -> None:
        while True:
            with self._lock:
                try:
                    job, nbytes = self._queue.get_nowait()
                except queue.Empty:
                    self._thread = None  # submit starts a new worker for the next job
                    return
            try:
                # after a failure later jobs are skipped (their spans would be children of a chunk that
                # never landed); after abandon every one is
                if self._error is None and not self._abandoned:
                    job()
            except BaseException as e:  # kept and re-raised to the caller, never lost on this thread
                self._error = e
            finally:
                with self._room:  # a skipped job frees its bytes too
                    self._bytes -= nbytes
                    self._room.notify_all()
                self._queue.task_done()
