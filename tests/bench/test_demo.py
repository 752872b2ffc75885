"""`kvtier demo`: its quick mode writes a consistent JSON and a PNG; its reply check calls a
difference a near-tie only when the logits say so."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kvtier.bench.demo import compare_replies, run_demo  # noqa: E402
from kvtier.cli import main as cli_main  # noqa: E402


def _logits(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(r) for r in rows]


def test_identical_decodes_are_the_same_reply() -> None:
    steps = _logits([0.0, 2.0, 1.0], [3.0, 1.0, 0.0])
    check = compare_replies(steps, [s.clone() for s in steps])
    assert check["same_reply"] is True and check["near_tie"] is False
    assert check["first_token_logit_difference"] == 0.0


def test_a_swap_inside_float_noise_is_a_near_tie() -> None:
    plain = _logits([0.0, 5.0, 1.0], [4.0, 4.0 + 2e-6, 1.0])
    kvtier = _logits([0.0, 5.0, 1.0], [4.0 + 2e-6, 4.0, 1.0])
    check = compare_replies(plain, kvtier)
    assert check["same_reply"] is False and check["near_tie"] is True
    assert check["step"] == 1
    assert check["lead"] == pytest.approx(2e-6, rel=0.1)


def test_a_swap_beyond_float_noise_is_a_mismatch() -> None:
    plain = _logits([0.0, 5.0, 1.0])
    kvtier = _logits([0.0, 1.0, 5.0])  # a clear second choice became first: not noise
    check = compare_replies(plain, kvtier)
    assert check["same_reply"] is False and check["near_tie"] is False
    assert check["lead"] == pytest.approx(4.0) and check["difference"] == pytest.approx(4.0)


def test_decodes_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        compare_replies(_logits([1.0, 0.0], [1.0, 0.0]), _logits([1.0, 0.0]))


def test_quick_demo_writes_json_and_png(tmp_path) -> None:
    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    result = run_demo(cache_dir=str(tmp_path / "store"), quick=True, json_out=str(out), png_out=str(png))
    data = json.loads(out.read_text())
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = data["turns"]
    assert len(rows) == data["params"]["conversations"] * data["params"]["turns"] == len(result["turns"])
    assert rows[0]["cached_tokens"] == 0  # the very first prompt is new
    doc = data["params"]["doc_tokens"]
    assert rows[1]["cached_tokens"] >= rows[0]["prompt_tokens"] // 16 * 16  # turn 2 finds turn 1's prompt
    second_chat = rows[data["params"]["turns"]]
    assert second_chat["cached_tokens"] >= doc // 16 * 16  # a new chat finds the shared document
    for row in rows:
        assert len(row["ttft_no_kvtier_runs_s"]) == len(row["ttft_kvtier_runs_s"]) == data["params"]["repeats"]
        assert row["same_reply"] or row["near_tie"]  # tiny model, float32: kvtier's KV gives the same replies
    assert data["reply_mismatches"] == 0
    assert data["restart"]["disk_chunks_read"] > 0 and data["restart"]["cached_tokens"] > 0


def test_demo_rejects_zero_repeats(tmp_path) -> None:
    with pytest.raises(ValueError, match="repeats"):
        run_demo(cache_dir=str(tmp_path / "store"), repeats=0)


def test_cli_quick_demo(tmp_path) -> None:
    out = tmp_path / "d.json"
    assert cli_main(["demo", "--quick", "--cache-dir", str(tmp_path / "s"), "--json", str(out),
                     "--png", str(tmp_path / "d.png")]) == 0
    assert json.loads(out.read_text())["params"]["repeats"] == 1
