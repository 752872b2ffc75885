"""The demo and the TTFT benchmark run end to end at small sizes and report consistent results."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_demo_runs_and_hits(tmp_path):
    from kvtier.bench.demo import run_demo

    result = run_demo(cache_dir=str(tmp_path / "demo"), turns=2, conversations=1)
    turns = result["turns"]
    assert len(turns) == 2
    assert turns[0]["cached_tokens"] == 0  # the first prompt is new
    assert turns[1]["cached_tokens"] > 0  # turn 2 repeats turn 1's prompt as its history
    assert 0 < result["hit_ratio"] < 1
    assert result["restart"]["cached_tokens"] > 0 and result["restart"]["disk_chunks_read"] > 0


def test_ttft_bench_quick(tmp_path):
    from kvtier.bench.ttft import run_ttft_bench

    out = tmp_path / "ttft.json"
    result = run_ttft_bench(str(out), quick=True)
    data = json.loads(out.read_text())
    assert data["cases"] and data["cases"] == result["cases"]
    for case in data["cases"]:
        for field in ("prompt_tokens", "no_kvtier_s", "miss_s", "dram_hit_s", "disk_hit_s", "dram_floor_s",
                      "disk_floor_s", "reduction_dram", "reduction_disk"):
            assert field in case
        assert case["dram_hit_s"] > 0 and case["disk_hit_s"] > 0
    for field in ("prompt_tokens", "hit_fraction", "hit_s", "load_only_s", "compute_only_s"):
        assert field in data["overlap"]
