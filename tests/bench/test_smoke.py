"""The TTFT benchmark runs end to end at small sizes and reports consistent results (the demo: test_demo.py)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


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
