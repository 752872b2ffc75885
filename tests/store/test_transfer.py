"""TransferEngine: where its threads run."""

import os

import pytest

from kvtier.store.transfer import TransferEngine

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")


def test_threads_run_on_the_cpus_given() -> None:
    cpu = max(os.sched_getaffinity(0))
    engine = TransferEngine(2, "pinned", cpus=(cpu,))
    try:
        assert engine.submit("probe", os.sched_getaffinity, 0).wait() == {cpu}
    finally:
        engine.shutdown()


def test_no_cpus_keeps_those_of_the_starting_thread() -> None:
    engine = TransferEngine(1, "free")
    try:
        assert engine.submit("probe", os.sched_getaffinity, 0).wait() == os.sched_getaffinity(0)
    finally:
        engine.shutdown()


def test_cpus_outside_the_allowed_set_leave_the_thread_where_it_was() -> None:
    engine = TransferEngine(1, "nowhere", cpus=(100_000,))
    try:
        assert engine.submit("probe", os.sched_getaffinity, 0).wait() == os.sched_getaffinity(0)
    finally:
        engine.shutdown()
