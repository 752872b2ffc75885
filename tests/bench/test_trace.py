"""Trace simulator: loader errors, the prefix rule, the offline reference as an upper bound."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kvtier.bench.trace import (
    DEFAULT_CAPACITIES_PCT,
    TraceFormatError,
    TraceRequest,
    block_tokens,
    distinct_chunks,
    hash_key,
    judge_target,
    library_default_policy,
    load_requests,
    load_trace,
    never_below_lru,
    ratio_to_lru,
    replay_metadata_path,
    run_trace_bench,
    run_trace_suite,
    simulate_belady,
    simulate_future_admission,
    simulate_tier,
    simulate_two_tier,
)
from kvtier.bench.traces import generate
from kvtier.cli import main
from kvtier.core.config import MemoryTierConfig
from kvtier.tiers.policies import POLICIES, make_policy


def req(*ids: int, ts: float = 0.0, length: int | None = None) -> TraceRequest:
    return TraceRequest(ts, length if length is not None else 512 * len(ids), 1, tuple(ids))


def random_trace(seed: int, n: int = 300) -> list[TraceRequest]:
    """Conversations and shared documents: each request extends a prefix of an earlier one."""
    rng = random.Random(seed)
    requests: list[TraceRequest] = []
    next_id = 1
    for i in range(n):
        if requests and rng.random() < 0.7:
            base = rng.choice(requests[-40:] if rng.random() < 0.8 else requests).hash_ids
            prefix = list(base[: rng.randint(1, len(base))])
        else:
            prefix = [0] if rng.random() < 0.5 else []
        new = list(range(next_id, next_id + rng.randint(1, 5)))
        next_id += len(new)
        ids = prefix + new
        requests.append(TraceRequest(float(i), 512 * len(ids) - rng.randrange(512), 0, tuple(ids)))
    return requests


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = '{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}'


def test_loader_reads_requests(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [GOOD, "", '{"timestamp": 12, "input_length": 512, "hash_ids": [0]}'])
    requests = load_trace(path)
    assert requests == [TraceRequest(0.0, 700, 5, (0, 1)), TraceRequest(12.0, 512, 0, (0,))]
    assert load_trace(path, max_requests=1) == requests[:1]
    assert requests[0].keys == [b"\0" * 8, b"\0" * 7 + b"\1"]
    assert hash_key(258) == b"\0" * 6 + b"\1\2"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 0, "input_length": 10}', "missing field 'hash_ids'"),
        ('{"timestamp": -1, "input_length": 10, "hash_ids": [1]}', "'timestamp'"),
        ('{"timestamp": 0, "input_length": "10", "hash_ids": [1]}', "'input_length'"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1, "2"]}', "'hash_ids'"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1, 1]}', "repeats"),
        ('{"timestamp": 0, "input_length": 2000, "hash_ids": [1, 2]}', "do not match input_length 2000"),
        ('{"timestamp": 0, "input_length": 100, "hash_ids": [1, 2]}', "do not match input_length 100"),
    ],
)
def test_loader_rejects_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path, [GOOD, line])
    with pytest.raises(TraceFormatError, match=message) as info:
        load_trace(path)
    assert f"{path}:2:" in str(info.value)


def test_block_tokens_last_block_partial() -> None:
    assert [block_tokens(1100, i) for i in range(3)] == [512, 512, 76]


def test_no_hit_after_a_miss_within_a_request() -> None:
    # key 2 is resident when request 2 asks for it, but its parent there (3) is not
    requests = [req(1, 2), req(3, 2), req(1, 2)]
    for name in POLICIES:
        counts = simulate_tier(requests, make_policy(name), 10)
        assert counts.block_hits == [0, 2], name
    assert simulate_belady(requests, 10).block_hits == [0, 2]


def test_hit_ratios_by_chunk_and_token() -> None:
    requests = [req(1, 2, length=700), req(1, 2, 3, length=1100)]
    counts = simulate_tier(requests, make_policy("lru"), 10)
    assert counts.block_hits == [0, 2] and counts.blocks == [2, 3]
    assert counts.token_hits == [0, 1024] and counts.tokens == [700, 1100]
    assert counts.block_ratio() == pytest.approx(2 / 5)
    assert counts.token_ratio(1) == pytest.approx(1024 / 1100)


def test_belady_bypasses_and_keeps_the_soonest() -> None:
    # capacity 1: the chunk reused next stays, the one reused later is not admitted
    requests = [req(1), req(2), req(1), req(2), req(1)]
    assert simulate_belady(requests, 1).block_hits == [0, 2]
    assert simulate_tier(requests, make_policy("lru"), 1).block_hits == [0, 0]


def test_future_admission_skips_chunks_never_asked_for_again() -> None:
    # capacity 1: plain LRU lets 2 (never used again) push out 1; told the future, it keeps 1
    requests = [req(1), req(2), req(1), req(3), req(1)]
    assert simulate_tier(requests, make_policy("lru"), 1).block_hits == [0, 0]
    assert simulate_future_admission(requests, 1).block_hits == [0, 2]
    # it knows whether, not when: 2 comes back after 1's next two uses, yet it pushes 1 out
    requests = [req(1), req(2), req(1), req(1), req(2)]
    assert simulate_future_admission(requests, 1).block_hits == [0, 1]
    assert simulate_belady(requests, 1).block_hits == [0, 2]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_reference_is_never_beaten(seed: int) -> None:
    requests = random_trace(seed)
    distinct = distinct_chunks(requests)
    for capacity in (2, 5, distinct // 20, distinct // 5, distinct):
        best = simulate_belady(requests, capacity)
        for name in POLICIES:
            counts = simulate_tier(requests, make_policy(name), capacity)
            assert sum(counts.block_hits) <= sum(best.block_hits), (name, capacity)
        told = simulate_future_admission(requests, capacity)
        assert sum(told.block_hits) <= sum(best.block_hits), capacity
        both = simulate_two_tier(requests, make_policy("lru"), make_policy("lru"), capacity, 1)
        assert sum(both.combined.block_hits) <= sum(simulate_belady(requests, 2 * capacity).block_hits)
    # with room for everything, the reference hits every chunk seen before (in prefix order)
    infinite = simulate_belady(requests, distinct)
    assert infinite.block_hits == simulate_tier(requests, make_policy("lru"), distinct).block_hits
    assert infinite.block_hits == simulate_future_admission(requests, distinct).block_hits


@pytest.mark.parametrize("name", ["lru", "lrfu"])
def test_two_tier_disk_hits_count_and_promote(name: str) -> None:
    requests = [req(1), req(2), req(3), req(1), req(1)]
    both = simulate_two_tier(requests, make_policy(name), make_policy(name), 1, 4)
    assert both.combined.block_hits == [0, 2]  # 1 from disk, then again from DRAM
    assert both.dram.block_hits == [0, 1]


def test_two_tier_disk_takes_chains_demoted_tail_first() -> None:
    # DRAM evicts 2 before 1; the disk must still end up with the whole chain
    requests = [req(1, 2), req(3, 4), req(1, 2)]
    for name in POLICIES:
        both = simulate_two_tier(requests, make_policy(name), make_policy(name), 2, 4)
        assert both.combined.block_hits == [0, 2], name


def test_metadata_path_matches_the_simulator() -> None:
    requests = random_trace(5, n=150)
    for name in ("lru", "lrfu"):
        meta = replay_metadata_path(requests, name, 40)
        counts = simulate_tier(requests, make_policy(name), 40)
        assert meta["block_hit_ratio"] == pytest.approx(counts.block_ratio())
        assert meta["chunk_lookups"] > 0 and meta["inserts"] > 0


def test_run_trace_bench_writes_json(tmp_path: Path) -> None:
    requests = random_trace(6, n=200)
    path = write_lines(tmp_path, [json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                                              "output_length": 1, "hash_ids": list(r.hash_ids)})
                                  for r in requests])
    out = tmp_path / "out.json"
    result = run_trace_bench(path, out, capacities_pct=(5, 20, 100), quiet=True)
    on_disk = json.loads(out.read_text())
    assert on_disk["default"] == result["default"] == MemoryTierConfig().policy in result["policies"]
    assert on_disk["first_half_choice"] in on_disk["policies"]
    assert len(on_disk["vs_lru"]["block_hit_ratio"]) == 3 and len(on_disk["vs_lru"]["second_half_block_hit_ratio"]) == 3
    assert isinstance(on_disk["vs_lru"]["never_below_0.99x_lru"], bool)
    assert on_disk["capacities"] == result["capacities"] and len(result["capacities"]) == 3
    assert "lru" in on_disk["policies"]
    for row in on_disk["policies"].values():
        for key in ("block_hit_ratio", "token_hit_ratio", "first_half_block_hit_ratio",
                    "second_half_block_hit_ratio"):
            assert len(row[key]) == 3
        for hit, best in zip(row["block_hit_ratio"], on_disk["optimal"]["block_hit_ratio"]):
            assert hit <= best + 1e-12
    assert set(on_disk["metadata_path"]) >= {"lookups_per_s", "inserts_per_s"}
    assert "lru" in on_disk["two_tier"]["policies"]
    assert on_disk["target"]["policy"] == on_disk["default"]
    for hit, best in zip(on_disk["future_admission"]["block_hit_ratio"], on_disk["optimal"]["block_hit_ratio"]):
        assert hit <= best + 1e-12
    assert len(on_disk["target"]["whole"]["future_admission_gap_closed"]) == 3
    assert len(on_disk["target"]["second_half"]["gap_closed"]) == 3


def test_judge_target_needs_half_the_gap_and_never_below_lru() -> None:
    def rows(whole: list[float], second: list[float]) -> dict[str, list[float]]:
        return {"block_hit_ratio": whole, "second_half_block_hit_ratio": second}

    optimal = rows([0.3, 0.55], [0.3, 0.55])
    lru = rows([0.1, 0.5], [0.1, 0.5])  # below 0.8 of Belady only at the first capacity
    judged = judge_target({"lru": lru, "x": rows([0.2, 0.5], [0.21, 0.5])}, optimal, "x")
    assert judged["met"]
    assert judged["whole"]["gap_closed"] == pytest.approx([0.5, 0.0])
    assert judged["whole"]["required"] == [True, False]
    assert not judge_target({"lru": lru, "x": rows([0.2, 0.5], [0.19, 0.5])}, optimal, "x")["met"]
    below = judge_target({"lru": lru, "x": rows([0.3, 0.49], [0.3, 0.5])}, optimal, "x")
    assert not below["met"] and not below["whole"]["never_worse_than_lru"]
    assert judge_target({"lru": lru}, rows([0.1, 0.5], [0.1, 0.5]), "lru")["whole"]["gap_closed"] == [None, None]


def test_default_is_the_librarys_and_capacities_start_at_1_and_2() -> None:
    assert library_default_policy() == MemoryTierConfig().policy == "guarded"
    assert DEFAULT_CAPACITIES_PCT[:2] == (1, 2)


def test_bench_judges_the_default_even_when_not_asked_for(tmp_path: Path) -> None:
    result = run_trace_bench("synthetic:zipf", tmp_path / "out.json", capacities_pct=(1, 2, 10),
                             max_requests=300, policies=["fifo"], quiet=True)
    assert list(result["policies"]) == ["lru", "guarded", "fifo"]
    assert result["default"] == "guarded" and result["target"]["policy"] == "guarded"
    assert result["capacities_pct"][:2] == [1, 2] and result["requests"] == 300
    assert result["vs_lru"]["block_hit_ratio"] == ratio_to_lru(result["policies"], "guarded")
    assert result["metadata_path"]["policy"] == "guarded"


def test_ratio_to_lru_and_the_floor() -> None:
    rows = {"lru": {"block_hit_ratio": [0.0, 0.5, 0.4]}, "x": {"block_hit_ratio": [0.1, 0.5, 0.39]}}
    assert ratio_to_lru(rows, "x") == [None, 1.0, pytest.approx(0.975)]
    assert not never_below_lru(ratio_to_lru(rows, "x"))
    assert never_below_lru([None, 1.0, 0.99])


def test_synthetic_spec_loads_a_generated_trace() -> None:
    assert load_requests("synthetic:loop", 50, seed=2) == generate("loop", 2, 50)


def test_suite_reports_the_default_against_lru_per_trace(tmp_path: Path) -> None:
    file_trace = tmp_path / "t.jsonl"
    file_trace.write_text("".join(json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                                              "hash_ids": list(r.hash_ids)}) + "\n"
                                  for r in random_trace(7, n=150)), encoding="utf-8")
    out = tmp_path / "suite.json"
    result = run_trace_suite(["synthetic:zipf", "synthetic:conversation", str(file_trace)], out,
                             capacities_pct=(1, 2, 20), max_requests=300, quiet=True)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["default"] == "guarded" and on_disk["capacities_pct"] == [1, 2, 20]
    assert list(on_disk["traces"]) == ["synthetic:zipf", "synthetic:conversation", str(file_trace)]
    for row in on_disk["traces"].values():
        assert set(row["policies"]) == {"lru", "guarded"}
        assert len(row["default_vs_lru"]) == 3 and len(row["capacities"]) == 3
        assert row["met"] == never_below_lru(row["default_vs_lru"], on_disk["floor"])
    ratios = [r for row in on_disk["traces"].values() for r in row["default_vs_lru"] if r is not None]
    assert on_disk["min_default_vs_lru"] == min(ratios)
    assert on_disk["met"] == all(row["met"] for row in on_disk["traces"].values())


def test_cli_replays_a_synthetic_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "trace.json"
    assert main(["bench", "trace", "--trace", "synthetic:system_prompt", "--max-requests", "200",
                 "--json", str(out), "--png", str(tmp_path / "r" / "trace.png")]) == 0
    result = json.loads(out.read_text())
    assert result["trace"] == "synthetic:system_prompt" and result["requests"] == 200
    assert "default guarded / LRU by capacity" in capsys.readouterr().out
