"""Decode's hot path (issue 22): one batched store read per layer, the plan made with tensor ops."""

from __future__ import annotations

import pytest
import torch

from kvtier.sparse import SparseKV

from .helpers import LAYOUT, config, make_store

L, H, D, BT = 2, 2, 8, 4


def random_kv(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, t, D, generator=g), torch.randn(L, H, t, D, generator=g)


@pytest.mark.parametrize("stage", [False, True])
def test_each_layer_reads_its_new_slices_in_one_store_call(stage: bool) -> None:
    store = make_store()
    kv = SparseKV(store, config("quest", budget=24), LAYOUT, salt=b"one", stage_fetches=stage)
    k, v = random_kv(256)
    for layer in range(L):
        kv.append(layer, k[layer], v[layer])
    calls: list[int] = []
    real_each = store.load_here_each
    store.load_here_each = lambda keys, dests, sections: (calls.append(len(keys)), real_each(keys, dests, sections))[1]
    store.load_here = lambda *a, **kw: pytest.fail("decode read the store per head")  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for layer in range(L):
            before = kv.working[layer].fetched_slices
            n_calls = len(calls)
            kv.attend(layer, torch.randn(2 * H, 1, D, generator=g), D**-0.5)
            new = kv.working[layer].fetched_slices - before
            # the slices of every head that wanted any, in one call; none when nothing changed
            assert calls[n_calls:] == ([new] if new else [])
    assert sum(calls) > 0
    store.close()
