"""decode_speed on a tiny synthetic shape: the row it reports, and what query drift does to churn."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier.bench.sparse import DecodeShape, decode_speed  # noqa: E402

TINY = DecodeShape(layers=2, kv_heads=2, head_size=16, q_heads=4, hidden=64, intermediate=128)


def run(drift: float) -> dict:
    (row,) = decode_speed([2048], budget=256, block_tokens=16, steps=3, shape=TINY, memory_bytes=64 << 20,
                          drift=drift)
    return row


def test_rows_stay_within_the_budget_and_report_churn() -> None:
    row = run(0.0)
    assert row["fast_tier_bytes"] == row["budget_kv_bytes"] + row["summary_bytes"]
    assert 0.0 < row["retrieval_churn"] <= 1.0
    assert row["query_drift"] == 0.0
    assert row["fetched_slices_per_step"] >= row["fetched_blocks_per_step"] > 0


def test_a_drifting_query_moves_the_selection_less() -> None:
    assert run(0.99)["retrieval_churn"] < run(0.0)["retrieval_churn"]


@pytest.mark.parametrize("drift", [-0.1, 1.0, 2.0])
def test_drift_outside_zero_to_one_is_refused(drift: float) -> None:
    with pytest.raises(ValueError, match="drift must be in"):
        run(drift)


def test_rows_split_out_the_store_reads() -> None:
    row = run(0.0)
    assert 0.0 < row["sparse_fetch_ms"] <= row["sparse_attn_ms"]
    assert row["fetch_us_per_slice"] > 0.0


def test_idle_memory_probe_reports_each_idle_time() -> None:
    from kvtier.bench.sparse import idle_memory_probe

    rows = idle_memory_probe((0.0, 0.05), section_bytes=4096, pool_bytes=8 << 20, sections=100)
    assert [r["idle_s"] for r in rows] == [0.0, 0.05]
    for r in rows:
        assert r["sections"] == 4  # one per 2 MiB region of the pool
        assert r["us_per_section"] > 0.0 and r["gb_per_s"] > 0.0


def test_idle_memory_probe_refuses_a_pool_without_a_region() -> None:
    from kvtier.bench.sparse import idle_memory_probe

    with pytest.raises(ValueError, match="2 MiB region"):
        idle_memory_probe((0.0,), pool_bytes=1 << 20)
