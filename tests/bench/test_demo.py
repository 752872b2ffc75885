"""`kvtier demo`: its quick mode writes a consistent JSON and a PNG; its reply check calls a
difference a near-tie only when the logits say so."""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kvtier.bench.demo import QUICK, DemoParams, compare_replies, demo_params, run_demo  # noqa: E402
from kvtier.cli import main as cli_main  # noqa: E402
from kvtier.core.errors import ConfigError  # noqa: E402


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


def test_quick_changes_only_the_sizes_not_given() -> None:
    assert demo_params(quick=True) == QUICK and demo_params() == DemoParams()
    p = demo_params(quick=True, turns=3, repeats=2)
    assert (p.turns, p.repeats) == (3, 2)
    assert (p.conversations, p.doc_tokens, p.question_tokens, p.reply_tokens) == (
        QUICK.conversations, QUICK.doc_tokens, QUICK.question_tokens, QUICK.reply_tokens)
    assert demo_params(doc_tokens=64, conversations=5) == DemoParams(doc_tokens=64, conversations=5)


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("size,value,needle", [("turns", 0, "turns must be at least 1, got 0"),
                                               ("conversations", -1, "conversations must be at least 1, got -1"),
                                               ("repeats", 0, "repeats must be at least 1, got 0"),
                                               ("doc_tokens", 8, "doc_tokens must be at least 16 (one chunk), got 8")])
def test_a_bad_size_is_an_error_with_or_without_quick(quick, size, value, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        demo_params(quick, **{size: value})


def test_quick_demo_ignored_turns_conversations_repeats_doc_tokens(tmp_path) -> None:
    """`kvtier demo --quick` replaced every size with its own, so --turns, --conversations,
    --repeats and --doc-tokens given with it did nothing."""
    out = tmp_path / "d.json"
    assert cli_main(["demo", "--quick", "--turns", "3", "--conversations", "1", "--repeats", "2",
                     "--doc-tokens", "64", "--cache-dir", str(tmp_path / "s"), "--json", str(out),
                     "--png", str(tmp_path / "d.png")]) == 0
    data = json.loads(out.read_text())
    assert {k: data["params"][k] for k in ("turns", "conversations", "repeats", "doc_tokens")} == {
        "turns": 3, "conversations": 1, "repeats": 2, "doc_tokens": 64}
    assert data["params"]["question_tokens"] == QUICK.question_tokens  # what was not given stays quick
    assert [(r["conversation"], r["turn"]) for r in data["turns"]] == [(1, 1), (1, 2), (1, 3)]
    assert all(len(r["ttft_kvtier_runs_s"]) == 2 for r in data["turns"])
    assert data["turns"][0]["prompt_tokens"] == 64 + QUICK.question_tokens


def test_quick_demo_with_a_bad_doc_tokens_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert cli_main(["demo", "--quick", "--doc-tokens", "8", "--cache-dir", str(tmp_path / "s"),
                     "--json", str(tmp_path / "d.json"), "--png", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvtier: error: doc_tokens must be at least 16 (one chunk), got 8"]
    assert not (tmp_path / "d.json").exists()
