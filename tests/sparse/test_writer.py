"""BackgroundWriter: jobs run in order on one thread, bounded by count and by the bytes they hold."""

from __future__ import annotations

import threading
import time

import pytest

from kvtier.sparse.errors import SparseWriteError
from kvtier.sparse.writer import BackgroundWriter


def test_jobs_run_in_order_and_drain_waits() -> None:
    w = BackgroundWriter(max_pending=4)
    seen: list[int] = []
    for i in range(10):
        w.submit(lambda i=i: seen.append(i), nbytes=1)
    w.drain()
    assert seen == list(range(10)) and w.pending == 0 and w.pending_bytes == 0


def test_a_submit_waits_while_the_queued_jobs_hold_max_bytes() -> None:
    w = BackgroundWriter(max_pending=8, max_bytes=100)
    gate = threading.Event()
    ran: list[str] = []
    w.submit(lambda: (gate.wait(), ran.append("a")), nbytes=60)
    second = threading.Thread(target=lambda: w.submit(lambda: ran.append("b"), nbytes=60))
    second.start()
    second.join(0.3)
    assert second.is_alive() and w.pending_bytes == 60  # 60 + 60 > 100: b is not queued while a holds its bytes
    gate.set()
    second.join(10)
    assert not second.is_alive()
    w.drain()
    assert ran == ["a", "b"] and w.pending_bytes == 0


def test_one_job_larger_than_the_bound_is_let_in_alone() -> None:
    w = BackgroundWriter(max_bytes=10)
    ran: list[int] = []
    w.submit(lambda: ran.append(1), nbytes=1000)
    w.submit(lambda: ran.append(2), nbytes=1000)
    w.close()
    assert ran == [1, 2]


def test_a_failed_job_frees_its_bytes_and_later_submits_raise() -> None:
    w = BackgroundWriter(max_bytes=100)
    gate = threading.Event()

    def boom() -> None:
        gate.wait()
        raise OSError("disk full")

    w.submit(boom, nbytes=80)
    waiter_error: list[BaseException] = []

    def later() -> None:
        try:
            w.submit(lambda: None, nbytes=80)  # waits for boom's bytes, then is queued and skipped
            w.drain()
        except SparseWriteError as e:
            waiter_error.append(e)

    t = threading.Thread(target=later)
    t.start()
    gate.set()
    t.join(10)
    assert not t.is_alive() and waiter_error and "disk full" in str(waiter_error[0])
    assert w.pending_bytes == 0
    with pytest.raises(SparseWriteError, match="disk full"):
        w.submit(lambda: None)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter(max_pending=0)
    with pytest.raises(ValueError, match="max_bytes"):
        BackgroundWriter(max_bytes=0)
    with pytest.raises(ValueError, match="nbytes"):
        BackgroundWriter().submit(lambda: None, nbytes=-1)


def test_abandon_skips_the_queued_jobs_and_waits_for_the_running_one() -> None:
    w = BackgroundWriter(max_pending=8)
    started, gate = threading.Event(), threading.Event()
    ran: list[str] = []
    w.submit(lambda: (started.set(), gate.wait(10), ran.append("running")))
    w.submit(lambda: ran.append("queued"))
    assert started.wait(10)
    dropping = threading.Thread(target=w.abandon)
    dropping.start()
    dropping.join(0.2)
    assert dropping.is_alive() and ran == []  # the job running is waited for
    gate.set()
    dropping.join(10)
    assert not dropping.is_alive() and ran == ["running"] and w.pending == 0 and w.pending_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(lambda: None)


def test_abandon_returns_a_failure_no_caller_was_told_of_and_raises_nothing() -> None:
    def boom() -> None:
        raise OSError("disk gone")

    w = BackgroundWriter()
    w.submit(boom)
    while w.pending:  # ran (a job not started when abandon comes is skipped)
        time.sleep(0.001)
    assert isinstance(w.abandon(), OSError)
    told = BackgroundWriter()
    told.submit(boom)
    with pytest.raises(SparseWriteError):
        told.drain()
    assert told.abandon() is None  # drain raised it: the caller knows
