"""The fleet bench's engine runs: what report() computes from the four runs' rows (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.bench.vllm import QUICK
from kvtier.bench.vllm_pd import report


def _out(rows: list[tuple[float, int, int]], prompt_tokens: int = 600) -> dict:
    return {"init_s": 1.0, "phases": [{"name": "measured", "requests": [
        {"ttft_s": t, "token": tok, "cached": cached, "prompt_tokens": prompt_tokens,
         "kv_transfer_params": None} for t, tok, cached in rows]}]}


def test_ratios_computed_chunks_and_token_checks() -> None:
    outs = {"kvtier_dram": _out([(0.10, 5, 512), (0.30, 6, 512)]),  # mean 0.2
            "prefill": _out([(0.9, 5, 0), (1.1, 6, 0)]),
            "shared": _out([(0.22, 5, 512), (0.26, 6, 512)]),  # mean 0.24
            "decode": _out([(0.1, 5, 599), (0.2, 7, 500)])}  # the second computed 100 tokens: 2 chunks of 64
    r = report(outs, QUICK, Path("/tmp/x"))
    assert r["vllm_shared"]["ttft_ratio"] == pytest.approx(1.2) and r["vllm_shared"]["same_tokens"] is True
    assert r["pd"]["ttft_ratio"] == pytest.approx(0.75)
    assert r["pd"]["prefill_plus_decode_ttft_s"] == pytest.approx(1.15)
    assert r["pd"]["max_computed_chunks"] == 2
    assert r["pd"]["same_tokens"] is False  # 7 is not the prefill instance's 6
