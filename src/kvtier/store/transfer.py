"""Transfer handles: explicit ids and completion for work running on worker threads.

A handle wraps a future. `wait()` returns the result or re-raises the exception the
worker hit, so no error dies silently on a background thread.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

R = TypeVar("R")


class TransferHandle(Generic[R]):
    __slots__ = ("id", "kind", "_future")

    def __init__(self, handle_id: int, kind: str, future: Future[R]) -> None:
        self.id = handle_id
        self.kind = kind
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> R:
        """Block until done; return the result or raise the worker's exception."""
        # the wait's own timeout apart from the worker's: concurrent.futures.TimeoutError is the
        # built-in TimeoutError, which a worker raises too (a socket or NFS timeout in a write)
        try:
            error = self._future.exception(timeout)
        except FutureTimeout:
            raise TimeoutError(f"{self.kind} transfer {self.id} did not finish in {timeout} s") from None
        if error is not None:
            raise error
        return self._future.result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[TransferHandle[R]], Any]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<TransferHandle {self.kind} #{self.id} {state}>"


def _run_on(cpus: tuple[int, ...]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)  # 0: this thread only
        except OSError:  # none of them allowed here (cpuset): stay where we are
            pass


class TransferEngine:
    """Worker threads plus a handle-id counter owned by one store."""

    def __init__(self, threads: int, name: str, cpus: tuple[int, ...] = ()) -> None:
        """`cpus`: run the threads on these CPUs (() = wherever the thread that starts them may run).

        An engine that pins its compute threads (vLLM's CPU worker) starts kvtier's threads
        from a pinned thread; given the cores it left free, copies overlap its compute.
        """
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name,
                                        initializer=_run_on, initargs=(cpus,))
        self._ids = itertools.count(1)

    def submit(self, kind: str, fn: Callable[..., R], *args: Any) -> TransferHandle[R]:
        return TransferHandle(next(self._ids), kind, self._pool.submit(fn, *args))

    def completed(self, kind: str, value: R) -> TransferHandle[R]:
        fut: Future[R] = Future()
        fut.set_result(value)
        return TransferHandle(next(self._ids), kind, fut)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
