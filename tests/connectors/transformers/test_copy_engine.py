"""The copy engine's logic on CPU tensors: staging reuse, deferred saves published after their copies,
and a failed device copy recomputed rather than served."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.connectors import copy_engine
from kvtier.connectors.copy_engine import DoneEvent, SaveCopies, StagingPool
from kvtier.connectors.transformers import TransformersConnector
from kvtier.core import metrics as m
from tests.connectors.transformers.prefix_util import TOL, hit_logits, last_logits, make_store, prompt, tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def test_staging_pool_reuses_one_buffer_and_lends_a_fresh_one_while_taken():
    pool = StagingPool("cpu")
    a = pool.acquire(100)
    b = pool.acquire(50)  # a is taken: a buffer of its own
    assert a.data_ptr() != b.data_ptr()
    pool.release(b)  # not the pool's: ignored
    pool.release(a, DoneEvent())
    c = pool.acquire(80)
    assert c.data_ptr() == a.data_ptr() and c.numel() == 80
    pool.release(c)
    d = pool.acquire(1000)  # grows
    assert d.numel() == 1000


class _SlowEvent:
    def __init__(self) -> None:
        self.released = threading.Event()

    def synchronize(self) -> None:
        assert self.released.wait(10)


def test_deferred_work_waits_for_its_event_and_keeps_order():
    copies = SaveCopies("cpu", threaded=True)
    done: list[int] = []
    gate = _SlowEvent()
    copies.then(gate, lambda: done.append(1), pytest.fail)
    copies.then(DoneEvent(), lambda: done.append(2), pytest.fail)
    assert done == []  # the first copy is not complete: nothing after it runs
    gate.released.set()
    copies.drain()
    assert done == [1, 2]


def test_deferred_error_reaches_on_error_and_the_queue_goes_on():
    copies = SaveCopies("cpu", threaded=True)
    errors: list[BaseException] = []
    done: list[int] = []

    def boom() -> None:
        raise OSError("disk gone")

    copies.then(DoneEvent(), boom, errors.append)
    copies.then(DoneEvent(), lambda: done.append(1), errors.append)
    copies.drain()
    assert [str(e) for e in errors] == ["disk gone"] and done == [1]


def test_saves_written_by_the_worker_are_published_and_served(model, tmp_path):
    ids = prompt(model.config.vocab_size, 29, seed=3)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store, plan_loads=False)
    conn.save_copies = SaveCopies("cpu", threaded=True)  # the CUDA arrangement, on the CPU
    conn.prefill(ids)
    conn.save_copies.drain()
    keys = conn.chunk_keys(ids[0].tolist())
    assert store.lookup(keys).hits == len(keys) == 7
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (28,)
    assert (got - last_logits(model, ids)).abs().max() < TOL
    store.close()


def test_a_failed_deferred_write_publishes_nothing_and_is_counted(model, tmp_path, monkeypatch):
    ids = prompt(model.config.vocab_size, 29, seed=4)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store, plan_loads=False)
    conn.save_copies = SaveCopies("cpu", threaded=True)
    from kvtier.store.tiered import SaveBatch

    real = SaveBatch.write_layer

    def fail_layer_1(self, layer, srcs):
        if layer == 1:
            raise OSError("no space left")
        return real(self, layer, srcs)

    monkeypatch.setattr(SaveBatch, "write_layer", fail_layer_1)
    _, out = conn.prefill(ids)
    conn.save_copies.drain()
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max() < TOL  # generation unaffected
    assert store.lookup(conn.chunk_keys(ids[0].tolist())).hits == 0  # no chunk with a layer missing
    assert conn.metrics.get(m.SAVE_FAILURES, connector="transformers") == 7
    store.close()


def test_a_failed_device_copy_is_recomputed(model, tmp_path, monkeypatch):
    ids = prompt(model.config.vocab_size, 29, seed=5)
    store = make_store(model, tmp_path)
    conn = TransformersConnector(model, store, plan_loads=False)
    conn.prefill(ids)
    calls = {"n": 0}
    real = copy_engine.LayerCopies.copy

    def fail_once(self, layer, src):
        calls["n"] += 1
        if calls["n"] == 2:  # layer 1 of the first attempt: as if CUDA refused the copy
            self._failed[layer] = "RuntimeError: CUDA error: out of memory"
            return None
        return real(self, layer, src)

    monkeypatch.setattr(copy_engine.LayerCopies, "copy", fail_once)
    cache, out = conn.prefill(ids)
    assert cache.last_plan.cached_tokens == (0,)  # every chunk the failed copy carried was recomputed
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max() < TOL
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") == 7
    store.close()
