"""Direct saves: each group of layers copied straight into the SaveBatch's reserved DRAM slots (the GPU
path, run here on the CPU with direct_saves=True): the stored bytes and checksums equal a staged save's,
hits load them to the same output, and a failed copy or fill publishes nothing and leaves the store's
slots consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.connectors.copy_engine import SaveCopies
from kvtier.connectors.transformers import TransformersConnector
from kvtier.connectors.transformers.connector import SAVE_FAILURES
from kvtier.store.tiered import SaveBatch
from tests.connectors.transformers.prefix_util import TOL, hit_logits, last_logits, make_store, prompt, tiny_model


def _stored(store) -> dict[bytes, tuple[bytes, tuple[int, ...]]]:
    """key -> (its slot's bytes, its section checksums), for every chunk in DRAM."""
    mem = store.memory
    return {k: (mem.slot_view(mem.slot_of(k)).tobytes(), mem.meta(k).checksums) for k in mem.keys()}


class _PoolSpy:
    """Records each to_pool call's pieces (first row, bytes) and can fail the n-th call."""

    def __init__(self, copies: SaveCopies, fail_at: int | None = None) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self._real = copies.to_pool
        self._fail_at = fail_at
        copies.to_pool = self  # type: ignore[method-assign]

    def __call__(self, src, pieces):
        if self._fail_at is not None and len(self.calls) == self._fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.calls.append([(row, dst.numel()) for row, dst in pieces])
        return self._real(src, pieces)


def _connector(model, store, **kw) -> TransformersConnector:
    conn = TransformersConnector(model, store, **kw)
    conn.save_copies = SaveCopies("cpu")  # not the process's shared one: a test may patch it
    return conn


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("threaded", [False, True])
def test_direct_save_equals_a_staged_save(group, threaded):
    model = tiny_model(num_layers=4)
    ids = prompt(128, 27, seed=41)
    staged, direct = make_store(model, None), make_store(model, None)
    _connector(model, staged).prefill(ids)
    conn = _connector(model, direct, direct_saves=True)
    conn.save_copies = SaveCopies("cpu", threaded=threaded)  # threaded: the CUDA ordering, worker and all
    conn.save_group_layers = group
    spy = _PoolSpy(conn.save_copies)
    cache, out = conn.prefill(ids)
    conn.save_copies.drain()
    assert cache.last_plan.cached_tokens == (0,)
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max().item() <= TOL
    want = _stored(staged)
    assert len(want) == 6 and _stored(direct) == want  # byte-exact, same checksums
    groups = -(-4 // group)
    lb = direct.layer_bytes
    assert len(spy.calls) == groups
    if group == 4:  # every layer in one copy: the six neighbouring slots are one piece
        assert spy.calls == [[(0, 6 * 4 * lb)]]
    else:  # a chunk's layers of a group are contiguous in its slot: one piece per chunk
        assert all(len(pieces) == 6 for pieces in spy.calls)
    assert direct.memory.slot_counts()["reserved"] == 0
    plan, got = hit_logits(_connector(model, direct, direct_loads=True), ids)  # loaded back, verified
    assert plan.cached_tokens == (24,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    staged.close()
    direct.close()


def test_direct_save_of_a_batch_with_padding_and_a_shared_prefix():
    model = tiny_model(num_layers=3)
    a = prompt(128, 26, seed=42)
    b = torch.cat([a[:, :16], prompt(128, 9, seed=43)], 1)  # shares 4 chunks with a
    ids = torch.zeros((2, 26), dtype=torch.long)
    ids[0] = a[0]
    ids[1, 1:] = b[0]
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    staged, direct = make_store(model, None), make_store(model, None)
    _connector(model, staged).prefill(ids, mask)  # the same batch, staged (a padded row's floats differ alone)
    conn = _connector(model, direct, direct_saves=True)
    conn.save_group_layers = 2  # groups of 2 and 1 layers
    spy = _PoolSpy(conn.save_copies)
    _, out = conn.prefill(ids, mask)
    assert (out.logits[0, -1] - last_logits(model, a)[0]).abs().max().item() <= TOL
    assert (out.logits[1, -1] - last_logits(model, b)[0]).abs().max().item() <= TOL
    assert len(_stored(direct)) == 6 + 2  # a's chunks, then b's own two after the shared four
    assert _stored(direct) == _stored(staged)
    assert len(spy.calls) == 2 * 2  # two batches (rows), two groups each
    for row in (a, b):
        plan, got = hit_logits(_connector(model, direct), row)
        assert plan.cached_tokens == (24,)
        assert (got - last_logits(model, row)).abs().max().item() <= TOL
    staged.close()
    direct.close()


@pytest.mark.parametrize("fail_at", [0, 1])
def test_a_failed_copy_publishes_nothing(fail_at):
    model = tiny_model(num_layers=4)
    ids = prompt(128, 27, seed=44)
    store = make_store(model, None)
    conn = _connector(model, store, direct_saves=True)
    conn.save_group_layers = 2
    _PoolSpy(conn.save_copies, fail_at=fail_at)  # the first or second group's copy raises
    cache, out = conn.prefill(ids)
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max().item() <= TOL  # generation unaffected
    assert store.lookup(conn.chunk_keys(ids[0].tolist())).hits == 0
    assert store.memory.slot_counts() == {"slots": store.memory.num_slots, "free": store.memory.num_slots,
                                          "reserved": 0, "resident": 0, "pinned": 0}
    assert conn.metrics.get(SAVE_FAILURES, connector="transformers") == 6
    conn.save_copies.to_pool = SaveCopies("cpu").to_pool  # type: ignore[method-assign]
    conn.prefill(ids)  # the next prefill misses and saves again, now that copies work
    assert store.lookup(conn.chunk_keys(ids[0].tolist())).hits == 6
    store.close()


def test_an_abort_waits_for_the_copies_already_queued_into_the_slots():
    model = tiny_model(num_layers=4)
    ids = prompt(128, 27, seed=47)
    store = make_store(model, None)
    conn = _connector(model, store, direct_saves=True)
    conn.save_group_layers = 2
    reserved_at_wait: list[int] = []

    class Pending:  # a copy still running on the save stream: waiting for it sees the slots still reserved
        def synchronize(self) -> None:
            reserved_at_wait.append(store.memory.slot_counts()["reserved"])

    real = conn.save_copies.to_pool
    calls = []

    def to_pool(src, pieces):
        calls.append(len(pieces))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: out of memory")
        real(src, pieces)
        return Pending()

    conn.save_copies.to_pool = to_pool  # type: ignore[method-assign]
    conn.prefill(ids)
    assert reserved_at_wait == [6, 6]  # the worker's wait before marking group 0, then the abort's wait
    assert store.memory.slot_counts()["reserved"] == 0 and store.lookup(conn.chunk_keys(ids[0].tolist())).hits == 0
    store.close()


def test_a_failed_fill_on_the_save_worker_publishes_nothing(monkeypatch):
    model = tiny_model(num_layers=4)
    ids = prompt(128, 27, seed=45)
    store = make_store(model, None)
    conn = _connector(model, store, direct_saves=True)
    conn.save_copies = SaveCopies("cpu", threaded=True)
    conn.save_group_layers = 1
    real = SaveBatch.mark_filled

    def mark_filled(self, first, span):
        if first == 2:
            raise RuntimeError("CUDA error: the copy's event reported a failure")
        real(self, first, span)

    monkeypatch.setattr(SaveBatch, "mark_filled", mark_filled)
    conn.prefill(ids)
    conn.save_copies.drain()
    assert store.lookup(conn.chunk_keys(ids[0].tolist())).hits == 0
    assert store.memory.slot_counts()["free"] == store.memory.num_slots
    assert conn.metrics.get(SAVE_FAILURES, connector="transformers") == 6
    store.close()


def test_dram_without_room_for_every_chunk_saves_through_staging(tmp_path):
    model = tiny_model()
    ids = prompt(128, 27, seed=46)
    chunk_bytes = make_store(model, None).layout.chunk_bytes(4)
    store = make_store(model, tmp_path, memory=3 * chunk_bytes)  # 6 new chunks, room for 3 in DRAM
    conn = _connector(model, store, direct_saves=True)
    spy = _PoolSpy(conn.save_copies)
    conn.prefill(ids)
    store.flush()
    assert spy.calls == []  # a chunk without a slot: the save is staged as before
    keys = conn.chunk_keys(ids[0].tolist())
    assert store.lookup(keys).hits == 6  # three in DRAM, the rest on disk
    plan, got = hit_logits(_connector(model, store), ids)
    assert plan.cached_tokens == (24,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    store.close()


def test_direct_saves_needs_an_in_process_store_with_dram_and_is_off_on_the_cpu(tmp_path):
    model = tiny_model()
    store = make_store(model, None)
    assert TransformersConnector(model, store).direct_saves is False
    store.close()
    disk_only = make_store(model, tmp_path, memory=None)
    with pytest.raises(ValueError, match="direct_saves=True needs an in-process TieredStore with a DRAM tier"):
        TransformersConnector(model, disk_only, direct_saves=True)
    disk_only.close()


@pytest.mark.parametrize("direct", [False, True])
def test_a_cpu_forward_checksums_its_saves_without_threads_beside_it(direct):
    model = tiny_model()
    ids = prompt(128, 27, seed=48)
    store = make_store(model, None)
    _connector(model, store, direct_saves=direct).prefill(ids)
    assert store.lookup(TransformersConnector(model, store).chunk_keys(ids[0].tolist())).hits == 6
    assert store._verify is None  # noqa: SLF001 - on the CPU the writes checksummed in the forward's thread
    store.close()


def test_to_pool_copies_rows_into_host_pieces():
    src = torch.arange(4 * 8, dtype=torch.uint8).view(4, 8)
    pool = torch.zeros(64, dtype=torch.uint8)
    event = SaveCopies("cpu").to_pool(src, [(0, pool[8:24]), (3, pool[40:48])])  # rows 0-1, then row 3
    assert event.query()
    got = pool.numpy()
    assert np.array_equal(got[8:24], np.arange(16)) and np.array_equal(got[40:48], np.arange(24, 32))
    assert not got[:8].any() and not got[24:40].any() and not got[48:].any()  # row 2 goes nowhere
