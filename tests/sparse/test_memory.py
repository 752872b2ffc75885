"""Decode memory: 16-bit summary bounds stay bounds and halve the table; scans upcast in bounded pieces
with the float32 path unchanged; the hash scan in pieces equals one piece; the memory breakdown runs."""

from __future__ import annotations

import pytest
import torch

from kvtier.bench.sparse_memory import LiveTensorTracker, memory_breakdown
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.sparse import SparseKV, Summarizer, SummaryTable, make_policy, sparse_store_layout
from kvtier.sparse import policies as policies_mod
from kvtier.sparse import summary as summary_mod
from kvtier.sparse.summary import round_outward
from kvtier.store.tiered import TieredStore

from .helpers import config, make_store

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_outward_rounding_keeps_bounds(dtype: torch.dtype) -> None:
    # float32 values between two 16-bit ones: round-to-nearest alone would move half of them inward
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    lo = round_outward(x, dtype, float("-inf"))
    hi = round_outward(x, dtype, float("inf"))
    assert lo.dtype == hi.dtype == dtype
    assert bool((lo.float() <= x).all()) and bool((hi.float() >= x).all())
    assert bool((lo.float() < x).any())  # some were rounded (the test is not vacuous)
    nearest = x.to(dtype).float()
    assert bool(((nearest - lo.float()).abs() <= (nearest.abs() * 2 ** -6)).all())  # at most one step away
    exact = x.to(dtype)  # values of the dtype stay as they are
    assert torch.equal(round_outward(exact.float(), dtype, float("-inf")), exact)
    assert torch.equal(round_outward(exact.float(), dtype, float("inf")), exact)


@pytest.mark.parametrize("dtype", HALF)
def test_table_bounds_in_16_bits_bound_every_key(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    h, d, bt, n = 2, 16, 8, 12
    keys = torch.randn(h, n * bt, d, generator=g) * 4  # float32 keys: their min/max need rounding
    s = Summarizer(h, d, hash_bits=16).compute(keys, bt)
    t = SummaryTable(h, d, 16, ("kmin", "kmax", "kmean"), bt, bounds_dtype=dtype)
    t.append(s)
    kmin, kmax = t.get("kmin"), t.get("kmax")
    assert kmin.dtype == kmax.dtype == t.get("kmean").dtype == dtype
    blocks = keys.view(h, n, bt, d)
    assert bool((kmin.float().unsqueeze(2) <= blocks).all()) and bool((kmax.float().unsqueeze(2) >= blocks).all())


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_sparse_kv_keeps_16_bit_bounds_exact_and_half_the_bytes(dtype: torch.dtype, name: str) -> None:
    h, d, bt, t = 2, 8, 4, 64
    layout = KVLayout(2, h, d, name)
    store = TieredStore(StoreConfig(chunk_tokens=bt, memory=MemoryTierConfig(capacity_bytes=1 << 22)),
                        sparse_store_layout(layout))
    kv = SparseKV(store, config("quest_mean", budget=16), layout, salt=b"b16", async_writes=False)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, h, t, d, generator=g).to(dtype)
    for layer in range(2):
        kv.append(layer, keys[layer], keys[layer])
    for layer in range(2):
        blocks = keys[layer].float().view(h, t // bt, bt, d)
        table = kv.tables[layer]
        # min and max of 16-bit keys are 16-bit values: stored exactly, not widened
        assert torch.equal(table.get("kmin").float(), blocks.amin(2))
        assert torch.equal(table.get("kmax").float(), blocks.amax(2))
    f32 = SummaryTable(h, d, 64, ("kmin", "kmax", "kmean"), bt)
    f32.append(Summarizer(h, d).compute(keys[0].float(), bt))
    assert kv.tables[0].nbytes * 2 == f32.nbytes  # 16-bit bounds: half the float32 table
    cap = 64  # blocks: the table grows in steps of 64
    assert kv.summary_bytes() == 2 * 3 * h * cap * d * 2  # layers x (kmin, kmax, kmean) x heads x blocks x d x 2 B
    store.close()


def test_float32_kv_keeps_float32_tables() -> None:
    store = make_store()
    kv = SparseKV(store, config("quest"), KVLayout(2, 2, 8), salt=b"f32")
    assert all(t.bounds_dtype == torch.float32 for t in kv.tables)
    store.close()


@pytest.mark.parametrize("policy", ["quest", "mean", "quest_mean", "quest_share"])
def test_16_bit_scan_in_pieces_matches_float32_scan_of_the_same_bounds(policy: str, monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    h, d, bt, n = 2, 16, 4, 40
    keys = torch.randn(h, n * bt, d, generator=g).to(torch.bfloat16).float()
    s = Summarizer(h, d, hash_bits=16).compute(keys, bt)
    fields = ("kmin", "kmax", "kmean")
    t16 = SummaryTable(h, d, 16, fields, bt, bounds_dtype=torch.bfloat16)
    t16.append(s)
    t32 = SummaryTable(h, d, 16, fields, bt)  # the very values t16 holds, in float32
    t32.append(type(s)(t16.get("kmin").float(), t16.get("kmax").float(), t16.get("kmean").float(), s.codes,
                       s.norms))
    per_block = h * 3 * d * 4
    monkeypatch.setattr(summary_mod, "SCAN_CHUNK_BYTES", 7 * per_block)  # several pieces, the last one short
    assert len(list(t16.upcast_pieces(fields, 3, 37))) == 5
    p = make_policy(policy)
    q = torch.randn(h, 3, d, generator=g)
    got = p.priority(q, t16, 3, 37, d**-0.5)
    want = p.priority(q, t32, 3, 37, d**-0.5)
    assert got.shape == want.shape == (h, 34)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hash_scan_in_pieces_equals_one_piece(monkeypatch) -> None:
    g = torch.Generator().manual_seed(4)
    h, d, bt, n = 2, 16, 4, 50
    keys = torch.randn(h, n * bt, d, generator=g)
    s = Summarizer(h, d, hash_bits=64)
    t = SummaryTable(h, d, 64, ("codes", "norms"), bt)
    t.append(s.compute(keys, bt))
    p = make_policy("hash", s.projection)
    q = torch.randn(h, 4, d, generator=g)
    whole = p.priority(q, t, 2, 47, d**-0.5)
    monkeypatch.setattr(policies_mod, "HASH_SCAN_BYTES", 1)  # one block per piece
    pieces = p.priority(q, t, 2, 47, d**-0.5)
    assert whole.shape == (h, 45)
    assert torch.equal(whole, pieces)


def test_tracker_sees_a_transient_and_its_release() -> None:
    def scratch() -> torch.Tensor:
        big = torch.ones(1 << 18)  # 1 MiB, freed on return
        return big.sum()

    with LiveTensorTracker() as tr:
        scratch()
    assert tr.peak >= 1 << 20
    assert tr.current < 1 << 20
    assert any("scratch" in label for label in tr.at_peak)


def test_memory_breakdown_runs_on_a_tiny_shape() -> None:
    r = memory_breakdown(layers=2, kv_heads=2, q_heads=4, head_size=8, dtype="bfloat16", context=512, block=16,
                         budget_fraction=1 / 4, steps=3, write_chunk=128, model_layers=4)
    assert r["setup"]["device"] == "cpu" and r["cuda_peak_bytes"] is None
    assert r["dense_kv_bytes"] == (512 + 3) * 2 * 2 * 8 * 2 * 2
    # working sets: 2 layers x K, V x 2 heads x (128 / 16 slots) x 16 tokens x 8 x 2 bytes
    assert r["held_bytes"]["working_sets"] == 2 * 2 * 2 * 8 * 16 * 8 * 2
    assert r["held_bytes"]["summaries"] == 2 * 2 * 2 * 64 * 8 * 2  # kmin + kmax in bfloat16, 64 blocks (growth step)
    assert r["transient_peak_bytes"] > 0 and r["transient_at_peak"]
    assert r["steady_peak_bytes"] <= r["transient_peak_bytes"]
    held = sum(r["held_bytes"].values())
    assert r["peak_over_dense"] == pytest.approx((held + r["transient_peak_bytes"]) / r["dense_kv_bytes"])


def test_tracker_counts_a_new_tensor_at_a_freed_address() -> None:
    """Allocators may hand a freed address out again at once (CUDA's caching allocator does): the new
    storage is counted and the dead one is not, whichever address the allocator picks."""
    n = 1 << 10
    with LiveTensorTracker() as tr:
        a = torch.ones(n)
        ptr = a.untyped_storage().data_ptr()
        del a
        b = torch.zeros(n)
        c = torch.zeros(n)
        assert tr.current == 2 * 4 * n, f"reused: {b.untyped_storage().data_ptr() == ptr}"  # b and c
    del b, c
    assert tr.peak == 2 * 4 * n
