"""Direct loads: a prefix wholly in DRAM copied straight out of the store's pool (the GPU path,
run here on the CPU with direct_loads=True): same output as recomputing, borrowed chunks
pinned against eviction and released, and a corrupt or vanished chunk recomputed, never served."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.connectors.transformers import TransformersConnector
from kvtier.core import metrics as m
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.store.tiered import TieredStore
from tests.connectors.transformers.prefix_util import TOL, hit_logits, last_logits, make_store, prompt, tiny_model


def _refs(store) -> list[int]:
    return [e.refs for e in store.memory._index.values()]  # noqa: SLF001 - the test checks the pins


class _Spy:
    """Counts the store's verify_borrowed calls (one per group of layers)."""

    def __init__(self, store) -> None:
        self.calls: list[list[int]] = []
        self.sizes: list[int] = []
        self._real = store.verify_borrowed
        store.verify_borrowed = self

    def __call__(self, entries, layers):
        self.calls.append(list(layers))
        self.sizes.append(len(entries))
        return self._real(entries, layers)


@pytest.mark.parametrize("group,job_bytes", [(1, 64 << 20), (2, 64 << 20), (4, 64 << 20), (1, 1)])
def test_direct_hit_equals_recompute(group, job_bytes, monkeypatch):
    model = tiny_model(num_layers=4)
    ids = prompt(128, 27, seed=31)
    store = make_store(model, None)
    TransformersConnector(model, store).prefill(ids)
    conn = TransformersConnector(model, store, direct_loads=True)
    conn.load_group_layers = group
    spy = _Spy(store)
    monkeypatch.setattr("kvtier.connectors.transformers.cache.VERIFY_JOB_BYTES", job_bytes)  # 1: a job per chunk
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (24,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    groups = [list(range(g, min(4, g + group))) for g in range(0, 4, group)]
    assert [c for i, c in enumerate(spy.calls) if c not in spy.calls[:i]] == groups
    assert set(spy.sizes) == ({1} if job_bytes == 1 else {6})  # 6 chunks: one job per group, or one per chunk
    assert set(_refs(store)) == {0}  # every borrowed chunk handed back
    store.close()


def test_direct_batch_with_padding_and_shared_prefix():
    model = tiny_model()
    a = prompt(128, 26, seed=32)
    b = torch.cat([a[:, :16], prompt(128, 5, seed=33)], 1)  # shares 4 chunks with a
    store = make_store(model, None)
    TransformersConnector(model, store).prefill(a)
    conn = TransformersConnector(model, store, direct_loads=True)
    ids = torch.zeros((2, 26), dtype=torch.long)
    ids[0] = a[0]
    ids[1, 5:] = b[0]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    plan, got = hit_logits(conn, ids, mask)
    assert plan.cached_tokens == (24, 16)
    assert (got[0] - last_logits(model, a)[0]).abs().max().item() <= TOL
    assert (got[1] - last_logits(model, b)[0]).abs().max().item() <= TOL
    assert set(_refs(store)) == {0}
    store.close()


def test_corrupt_dram_section_is_recomputed_and_dropped():
    model = tiny_model()
    ids = prompt(128, 27, seed=34)
    store = make_store(model, None)
    TransformersConnector(model, store).prefill(ids)
    conn = TransformersConnector(model, store, direct_loads=True)
    keys = conn.chunk_keys(ids[0].tolist())
    slot = store.memory.slot_of(keys[3])
    store.memory.layer_view(slot, 1)[7] ^= 0xFF  # one byte of chunk 3, layer 1, in the pool
    plan, got = hit_logits(conn, ids)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    assert plan.cached_tokens == (12,)  # the retry stopped before the corrupt chunk
    assert store.metrics.get(m.CHECKSUM_FAILURES, tier="memory") == 1
    assert conn.metrics.get(m.LOAD_FAILURES, connector="transformers") >= 1
    # the corrupt copy was unindexed (its slot freed once released) and the recompute saved chunk 3 again
    assert store.memory.contains(keys[3])
    assert set(_refs(store)) == {0}
    assert len(store.memory._free) + len(store.memory._index) == store.memory.num_slots  # noqa: SLF001 - no slot leaked
    plan2, got2 = hit_logits(conn, ids)
    assert plan2.cached_tokens == (24,)
    assert (got2 - last_logits(model, ids)).abs().max().item() <= TOL
    store.close()


def test_chunk_evicted_before_borrow_is_recomputed():
    model = tiny_model()
    ids = prompt(128, 27, seed=35)
    store = make_store(model, None)
    TransformersConnector(model, store).prefill(ids)
    conn = TransformersConnector(model, store, direct_loads=True)
    keys = conn.chunk_keys(ids[0].tolist())
    real = store.borrow_memory
    calls = []

    def borrow_after_delete(ks):
        if not calls:  # between the lookup and the borrow, chunk 2 leaves DRAM
            assert store.memory.delete(keys[2])
        calls.append(len(ks))
        return real(ks)

    store.borrow_memory = borrow_after_delete
    plan, got = hit_logits(conn, ids)
    assert plan.cached_tokens == (8,)
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    assert set(_refs(store)) == {0}
    store.close()


def test_borrowed_chunks_are_not_evicted_until_released():
    model = tiny_model()
    layout_store = make_store(model, None)
    chunk_bytes = layout_store.memory.chunk_bytes
    layout_store.close()
    from kvtier.connectors.transformers import model_layout

    store = TieredStore(StoreConfig(chunk_tokens=4, memory=MemoryTierConfig(capacity_bytes=6 * chunk_bytes)),
                        model_layout(model))
    conn = TransformersConnector(model, store)
    ids = prompt(128, 25, seed=36)
    conn.prefill(ids)  # 6 chunks: DRAM full
    keys = conn.chunk_keys(ids[0].tolist())
    entries = store.borrow_memory(keys[:2])
    assert all(e is not None for e in entries)
    conn.prefill(prompt(128, 25, seed=37))  # 6 more chunks: everything evictable goes
    assert store.memory.contains(keys[0]) and store.memory.contains(keys[1])
    assert not store.memory.contains(keys[2])
    store.release_borrowed(entries)
    with pytest.raises(ValueError, match="not pinned"):
        store.release_borrowed(entries)
    conn.prefill(prompt(128, 25, seed=38))
    assert not store.memory.contains(keys[0])
    store.close()


def test_direct_loads_needs_an_in_process_store_and_is_off_on_the_cpu():
    from kvtier.client.api import InProcessClient

    model = tiny_model()
    store = make_store(model, None)
    assert TransformersConnector(model, store).direct_loads is False  # auto: only on CUDA with a locked pool
    client = InProcessClient(store)
    with pytest.raises(ValueError, match="direct_loads=True needs an in-process TieredStore"):
        TransformersConnector(model, client, direct_loads=True)
    store.close()


def test_verify_borrowed_rejects_bad_layers():
    model = tiny_model()
    store = make_store(model, None)
    with pytest.raises(ValueError, match="outside"):
        store.verify_borrowed([], [5])
    store.close()


@pytest.mark.parametrize("direct_saves", [False, True])
def test_cache_dropped_mid_prefill_gives_back_its_chunks_and_reservations(direct_saves):
    """A cache dropped while its forward is under way (an exception in the model, no discard())
    hands its borrowed chunks and its saves' DRAM reservations back when it is collected, instead
    of pinning them for the life of the process."""
    import gc

    model = tiny_model()
    store = make_store(model, None)
    ids = prompt(128, 27, seed=39)
    TransformersConnector(model, store).prefill(ids[:, :16])  # 4 chunks stored
    conn = TransformersConnector(model, store, direct_loads=True, direct_saves=direct_saves)
    mem = store.memory
    cache = conn.new_cache()
    plan = cache.prepare(ids)  # borrows the 4 stored chunks
    assert plan.cached_tokens == (16,)
    assert set(_refs(store)) == {1}

    def fail(*_args):
        raise RuntimeError("out of memory in the last layer")

    hook = model.model.layers[-1].register_forward_pre_hook(fail)  # the layers before reserved slots for saves
    try:
        with pytest.raises(RuntimeError, match="out of memory"), torch.no_grad():
            model(**plan.model_inputs(), **conn.cache_kwargs(cache), use_cache=True)
    finally:
        hook.remove()
    assert len(mem._free) + len(mem._index) < mem.num_slots  # noqa: SLF001 - slots reserved for the saves
    del cache, plan
    gc.collect()  # the finalizer hands the clean-up to a thread of its own: wait for it
    for t in [t for t in threading.enumerate() if t.name == "kvtier-drop-prefill"]:
        t.join(10)
    conn.save_copies.drain()  # the release runs after the last copy out of the slots
    assert set(_refs(store)) == {0}
    assert len(mem._free) + len(mem._index) == mem.num_slots  # noqa: SLF001 - every reservation went back
    _, got = hit_logits(conn, ids)  # the store works as before
    assert (got - last_logits(model, ids)).abs().max().item() <= TOL
    store.close()
