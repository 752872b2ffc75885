"""The fleet bench's `routing` row: its streams, the TTFT attribution and report() (no engine)."""

from __future__ import annotations

import random

import pytest

from kvtier.bench.fleet import routing_line, run_fleet_bench
from kvtier.bench.vllm import Sizes
from kvtier.bench.vllm_routing import ARMS, Pair, Stream, arm_stream, on_one_of, report
from kvtier.bench.vllm_servers import server_args
from kvtier.cli import main


def test_stream_is_rounds_of_documents_in_turn_on_fresh_documents() -> None:
    sizes = Sizes(doc_tokens=8, question_tokens=2)
    rng = random.Random(0)
    a, b = arm_stream(sizes, Stream(docs=3, questions=2), rng), arm_stream(sizes, Stream(docs=3, questions=2), rng)
    assert [(r, d) for r, d, _ in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert a[0][2][:8] == a[3][2][:8] and a[0][2] != a[3][2]  # one document, two questions
    assert {tuple(p[:8]) for _, _, p in a}.isdisjoint({tuple(p[:8]) for _, _, p in b})  # each arm its own


@pytest.mark.parametrize(("docs", "questions"), [(2, 3), (0, 3), (3, 1)])
def test_stream_shapes_round_robin_cannot_game_are_refused(docs: int, questions: int) -> None:
    with pytest.raises(ValueError, match="docs must be odd|questions must be"):
        Stream(docs=docs, questions=questions)


def test_servers_publish_their_kv_events_and_the_proxy_subscribes(tmp_path) -> None:
    pair = Pair(Sizes(), Stream(), tmp_path / "model", tmp_path)
    args = server_args(pair.llm("r1"), 8100)
    events = args[args.index("--kv-events-config") + 1]
    assert f'"endpoint": "ipc://{tmp_path}/r1.events"' in events and '"enable_kv_cache_events": true' in events
    assert "--kv-transfer-config" in args


class FakeServer:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def ttft_sum(self) -> tuple[float, float]:
        return self.total, self.count


def test_ttft_is_read_from_the_server_that_took_the_request() -> None:
    servers = {"r0": FakeServer(), "r1": FakeServer()}

    def send() -> str:
        servers["r1"].total += 0.25
        servers["r1"].count += 1
        return "answer"

    assert on_one_of(servers, send) == ("answer", "r1", 0.25)  # type: ignore[arg-type]

    def both() -> None:
        for s in servers.values():
            s.count += 1

    with pytest.raises(RuntimeError, match="one more TTFT sample on one server"):
        on_one_of(servers, both)  # type: ignore[arg-type]


def _row(arm: str, rnd: int, doc: int, server: str, ttft: float, cached: int) -> dict:
    return {"arm": arm, "round": rnd, "doc": doc, "server": server, "ttft_s": ttft, "wall_s": ttft + 0.01, "cached": cached,
            "prompt_tokens": 100, "token": 7}


def test_report_compares_the_arms_after_first_visits() -> None:
    rows = [_row("cache_aware", 0, 0, "r0", 1.0, 0), _row("round_robin", 0, 0, "r0", 1.2, 0),
            _row("cache_aware", 1, 0, "r0", 0.2, 96), _row("round_robin", 1, 0, "r1", 1.0, 0),
            _row("cache_aware", 2, 0, "r0", 0.4, 96), _row("round_robin", 2, 0, "r0", 0.4, 96)]
    r = report(rows, Stream(docs=1, questions=3))
    assert r["cache_aware_ttft_s"] == pytest.approx(0.3) and r["round_robin_ttft_s"] == pytest.approx(0.7)
    assert r["ttft_ratio"] == pytest.approx(0.3 / 0.7)
    assert r["cache_aware"]["mean_wall_s"] == pytest.approx(0.31)
    assert r["cache_aware"]["first_visit_ttft_s"] == 1.0 and r["round_robin"]["cached_fraction"] == pytest.approx(0.48)
    assert r["cache_aware"]["placement"] == {0: ["r0", "r0", "r0"]} and r["max_load_share"] == 2.0
    assert r["round_robin"]["requests_per_server"] == {"r0": 2, "r1": 1}
    assert set(ARMS) <= set(r) and "cache_aware_ttft_s 0.3000" in routing_line(r)
    assert r["hit_ttft_by_previous_server"] == {"after_other_server": {"requests": 1, "mean_ttft_s": 0.4},
                                               "after_same_server": {"requests": 2, "mean_ttft_s": pytest.approx(0.3)}}


def test_unknown_engine_runs_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown engine runs"):
        run_fleet_bench(engine_runs=("pd", "nope"))
    with pytest.raises(SystemExit):
        main(["bench", "fleet", "--vllm-runs", "pd,x"])
    assert "argument --vllm-runs: expected a comma-separated list of pd, routing" in capsys.readouterr().err
