"""SparseKV.discard: a request dropped by its owner (a cache reset, a cache collected) gives back
everything it holds and raises nothing. Regression tests for the bug that a dropped SparseKV kept
its prefetch thread, the DRAM slots of a span whose save never committed, and the store's
refusals of its saves (never raised, never logged); closing it instead would raise the old
request's errors into the next one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch

from kvtier.sparse import SparseKV
from kvtier.sparse.errors import BlocksNotStoredError
from tests.sparse.helpers import LAYOUT, config, make_store
from tests.sparse.test_save_faults import BLOCKS, BT, D, H, L, prefill, small_disk_store

LOGGER = "kvtier.sparse.kv"


def wait_until(ok: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def join_discard_threads() -> None:
    for t in threading.enumerate():
        if t.name == "kvtier-sparse-discard":
            t.join(30)


def not_stored_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
            and "not stored" in r.getMessage()]


@pytest.mark.parametrize("async_writes", [True, False])
def test_discard_mid_span_gives_back_the_dram_reservations_and_keeps_what_was_committed(async_writes):
    store = make_store(memory_bytes=1 << 20)
    assert store.memory is not None
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"mid", async_writes=async_writes)
    k, v = prefill(kv, tokens=6 * BT)
    kv.flush()
    committed = list(kv.block_keys)
    nxt = torch.randn(L, H, 10 * BT, D)
    kv.append(0, nxt[0], nxt[0])  # a forward that stops before layer 1: the span's save never commits
    assert wait_until(lambda: store.memory.slot_counts()["reserved"] == 10)
    kv.discard()  # raises nothing
    counts = store.memory.slot_counts()
    assert counts["reserved"] == 0 and counts["resident"] == 6 and counts["free"] == counts["slots"] - 6
    assert store.lookup(kv.block_keys, touch=False).hits == 6  # the committed ones, as written
    out = torch.empty(1, 2, store.layer_bytes, dtype=torch.uint8)
    kv._store_gather(1, torch.tensor([0]).numpy(), torch.tensor([5]).numpy(), out.numpy())
    got = out.view(torch.float32).view(2, BT, D)
    assert torch.equal(got[0], k[1, 0, 5 * BT : 6 * BT]) and torch.equal(got[1], v[1, 0, 5 * BT : 6 * BT])
    assert kv.block_keys[:6] == committed
    with pytest.raises(RuntimeError, match="discarded"):
        kv.append(0, nxt[0], nxt[0])
    with pytest.raises(RuntimeError, match="discarded"):
        kv.attend(0, torch.randn(2 * H, 1, D), D ** -0.5)
    kv.flush()  # nothing after discard
    kv.close()
    kv.discard()
    store.close()


def test_discard_skips_the_queued_writes_and_nothing_writes_after_it():
    """Span 1's first job runs (held at its begin_save), the rest wait in the writer: discard waits
    for the running job only, skips the rest, and aborts span 1's save, which holds DRAM slots but
    is no longer the span being appended (every layer of it was)."""
    store = make_store(memory_bytes=1 << 20)
    assert store.memory is not None
    real_begin, real_commit = store.begin_save, store._commit
    gate = threading.Event()
    calls: list[str] = []

    def held_begin(*a, **kw):
        calls.append("begin")
        gate.wait(10)
        return real_begin(*a, **kw)

    def counted_commit(*a, **kw):
        calls.append("commit")
        return real_commit(*a, **kw)

    store.begin_save = held_begin
    store._commit = counted_commit
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"queued")
    prefill(kv, tokens=4 * BT)
    prefill(kv, tokens=4 * BT, seed=1)  # span 2: its two jobs queued behind span 1's second
    assert wait_until(lambda: calls == ["begin"])  # span 1's first job runs
    dropping = threading.Thread(target=kv.discard)
    dropping.start()
    dropping.join(0.3)
    assert dropping.is_alive()  # waits for the job running
    gate.set()
    dropping.join(10)
    assert not dropping.is_alive()
    assert calls == ["begin"]  # span 1's layer 0 only: its layer 1, its commit and span 2 were skipped
    time.sleep(0.05)
    assert calls == ["begin"]
    counts = store.memory.slot_counts()
    assert counts["reserved"] == 0 and counts["free"] == counts["slots"]  # span 1's 4 slots given back
    assert store.lookup(kv.block_keys, touch=False).hits == 0  # never published
    store.close()


def test_discard_logs_a_refused_save_once_and_raises_nothing(tmp_path, caplog):
    store = small_disk_store(tmp_path)  # no DRAM tier: the blocks a full disk refused are in no tier
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"refused")
    prefill(kv)
    kv._writer.drain()
    store.flush()  # the refusals landed, unchecked: close would raise them
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kv.discard()
        kv.discard()
        kv.close()
    (record,) = not_stored_warnings(caplog)
    assert "refused by the disk tier" in record.getMessage() and "in no tier of the store" in record.getMessage()
    kept = store.disk.usage().chunks
    assert 0 < kept < BLOCKS and store.lookup(kv.block_keys[:kept], touch=False).hits == kept
    store.close()


def test_discard_logs_the_saves_still_writing_when_they_end(tmp_path, caplog):
    store = small_disk_store(tmp_path)
    assert store.disk is not None
    real = store.disk.write
    gate = threading.Event()

    def held_write(*a, **kw):
        gate.wait(10)
        return real(*a, **kw)

    store.disk.write = held_write
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"writing")
    prefill(kv)
    kv._writer.drain()  # committed: the disk writes wait at the gate
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kv.discard()  # returns with the writes in flight
        assert not not_stored_warnings(caplog)
        gate.set()
        join_discard_threads()
    (record,) = not_stored_warnings(caplog)
    assert "refused by the disk tier" in record.getMessage()
    store.close()


def test_discard_does_not_log_what_flush_already_raised(tmp_path, caplog):
    store = small_disk_store(tmp_path)
    kv = SparseKV(store, config("quest", budget=16), LAYOUT, salt=b"told")
    prefill(kv)
    with pytest.raises(BlocksNotStoredError):
        kv.flush()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kv.discard()
    assert not [r for r in caplog.records if r.name == LOGGER]
    store.close()


def test_discard_stops_the_prefetch_thread():
    store = make_store(memory_bytes=1 << 22)
    kv = SparseKV(store, config("quest", budget=16, prefetch_blocks=2), LAYOUT, salt=b"prefetch")
    prefill(kv, tokens=24 * BT)
    before = set(threading.enumerate())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for layer in range(L):
            kv.attend(layer, torch.randn(2 * H, 1, D, generator=g), D ** -0.5)
    assert kv._prefetch is not None and kv._prefetch.prefetched_slices > 0
    (mine,) = [t for t in threading.enumerate() if t not in before and t.name.startswith("kvtier-sparse-prefetch")]
    kv.discard()
    assert not mine.is_alive()  # lived until the collector found the request before
    store.close()
