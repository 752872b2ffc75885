"""The fleet bench's engine runs: what report() computes from the servers' rows (no engine)."""

from __future__ import annotations

import pytest

from kvtier.bench.vllm import QUICK, Sizes, _llm_kwargs
from kvtier.bench.vllm_pd import report, workload
from kvtier.bench.vllm_servers import cached_of, server_args, token_of


def _rows(rows: list[tuple[float, int, int]], prompt_tokens: int = 600) -> list[dict]:
    return [{"ttft_s": t, "token": tok, "cached": cached, "prompt_tokens": prompt_tokens} for t, tok, cached in rows]


def _run(decode_second: int = 6, decode_ttft: float = 0.2) -> dict:
    return {"first_visit": [True, False], "rows": {
        "dram": _rows([(0.10, 5, 512), (0.30, 6, 512)]),  # mean 0.2
        "prefill": _rows([(0.9, 5, 0), (1.1, 6, 0)]),
        "shared": _rows([(0.22, 5, 599), (0.26, 6, 599)]),  # mean 0.24; first visit 0.22 / 0.10
        "shared_redis": _rows([(0.20, 5, 599), (0.40, 6, 599)]),  # mean 0.30
        "decode": _rows([(0.1, 5, 599), (decode_ttft, decode_second, 500)]),  # the second computed 100 tokens
        "e2e": _rows([(1.0, 5, 0), (1.4, decode_second, 0)])}}


def test_ratios_computed_chunks_and_token_checks_of_one_repeat() -> None:
    r = report([_run(decode_second=7)], QUICK)
    shared = r["vllm_shared"]
    assert shared["folder"]["ttft_ratio"] == pytest.approx(1.2) and shared["folder"]["same_tokens"] is True
    assert shared["folder"]["first_visit_ttft_ratio"] == pytest.approx(2.2)
    assert shared["redis"]["ttft_ratio"] == pytest.approx(1.5)
    assert shared["ttft_ratio"] == pytest.approx(1.5) and shared["same_tokens"] is True  # the worse of the two
    pd = r["pd"]
    assert pd["ttft_ratio"] == pytest.approx(0.75)
    assert pd["e2e_ttft_s"] == pytest.approx(1.2) and pd["e2e_ttft_ratio"] == pytest.approx(6.0)
    assert pd["e2e_over_prefill"] == pytest.approx((1.0 / 0.9 + 1.4 / 1.1) / 2)
    assert pd["max_computed_chunks"] == 2  # 100 tokens in chunks of QUICK's 64
    assert pd["same_tokens"] is False  # 7 is not the prefill instance's 6


def test_prompts_the_reference_missed_are_left_out_of_every_ratio() -> None:
    run = _run()
    run["rows"]["dram"][1]["cached"] = 0  # its pool lost the document: 0.30 s is no DRAM hit
    r = report([run], QUICK)
    assert r["details"]["reference_misses"] == [1]
    assert r["vllm_shared"]["folder"]["ttft_ratio"] == pytest.approx(2.2)  # prompt 0 alone: 0.22 / 0.10
    assert r["pd"]["ttft_ratio"] == pytest.approx(1.0) and r["pd"]["e2e_ttft_s"] == pytest.approx(1.0)


def test_ratios_are_medians_over_repeats_and_checks_hold_for_all() -> None:
    runs = [_run(decode_ttft=t) for t in (0.2, 0.7, 0.3)]  # decode means 0.15, 0.4, 0.2 over dram's 0.2
    pd = report(runs, QUICK)["pd"]
    assert pd["ttft_ratio"] == pytest.approx(1.0) and len(pd["per_repeat"]) == 3
    assert report([_run(), _run(decode_second=9)], QUICK)["pd"]["same_tokens"] is False


def test_workload_is_fresh_per_seed_and_marks_first_visits() -> None:
    sizes = Sizes(docs=2, doc_tokens=8, question_tokens=2, rounds=2)
    warm, measured, first = workload(sizes, 1)
    assert len(warm) == 2 and len(measured) == 4 and first == [True, True, False, False]
    assert measured[0][:8] == measured[2][:8] == warm[0][:8] and measured[0] != measured[2]
    assert workload(sizes, 2)[1][0][:8] != measured[0][:8]


def test_server_args_mirror_the_runners_engine_arguments() -> None:
    llm = _llm_kwargs(__import__("pathlib").Path("/m"), QUICK, 1000, kv_transfer_config={"kv_role": "kv_both"})
    args = server_args(llm, 8123)
    for flag, value in (("--port", "8123"), ("--block-size", str(QUICK.block)), ("--dtype", "float32"),
                        ("--kv-cache-memory-bytes", str(1000 * QUICK.kv_bytes_per_token)),
                        ("--kv-transfer-config", '{"kv_role": "kv_both"}')):
        assert args[args.index(flag) + 1] == value
    assert "--enable-prefix-caching" in args and "--enable-prompt-tokens-details" in args


def test_answer_fields() -> None:
    answer = {"choices": [{"token_ids": [42]}], "usage": {"prompt_tokens_details": {"cached_tokens": 64}}}
    assert token_of(answer) == 42 and cached_of(answer) == 64
    assert token_of({"error": {}}) is None and cached_of({"usage": None}) == 0
