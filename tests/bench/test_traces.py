"""Synthetic traces: deterministic, valid Mooncake records, and each of the shape it claims."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kvtier.bench.trace import BLOCK_TOKENS, TraceRequest, load_trace
from kvtier.bench.traces import SYNTHETIC_TRACES, generate, write_trace
from kvtier.core.errors import ConfigError


def full_blocks(req: TraceRequest) -> tuple[int, ...]:
    return req.hash_ids[: req.input_length // BLOCK_TOKENS]


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TRACES))
def test_deterministic_valid_and_round_trips(name: str, tmp_path: Path) -> None:
    requests = generate(name, 3, 400)
    assert len(requests) == 400
    assert requests == generate(name, 3, 400)
    assert requests != generate(name, 4, 400)
    times = [r.timestamp_ms for r in requests]
    assert times == sorted(times)
    path = tmp_path / f"{name}.jsonl"
    write_trace(requests, path)
    assert load_trace(path) == requests  # every line passes the loader's checks


def test_unknown_name_and_bad_size_are_named() -> None:
    with pytest.raises(ConfigError, match="'nope' is unknown; choose one of"):
        generate("nope")
    with pytest.raises(ConfigError, match="requests >= 1"):
        generate("zipf", 0, 0)


def test_zipf_popularity_is_skewed() -> None:
    requests = generate("zipf", 0, 3000)
    heads = Counter(r.hash_ids[0] for r in requests)
    counts = sorted(heads.values(), reverse=True)
    assert counts[0] > 50 * counts[len(counts) // 2]  # the top document vs the median one
    assert sum(counts[:30]) > 0.25 * len(requests)


def test_zipf_drift_moves_popularity_to_new_documents() -> None:
    requests = generate("zipf_drift", 0, 3000)
    sixth = len(requests) // 6
    first = Counter(r.hash_ids[0] for r in requests[:sixth])
    last = Counter(r.hash_ids[0] for r in requests[-sixth:])
    assert not set(first) & set(last)


def test_scan_reads_more_than_a_cache_and_sometimes_reads_it_again() -> None:
    requests = generate("scan", 0, 4000)
    uses = Counter(h for r in requests for h in r.hash_ids)
    distinct = len(uses)
    once = sum(1 for n in uses.values() if n == 1)
    assert once > 0.5 * distinct  # mostly one-off documents...
    again = sum(1 for n in uses.values() if 2 <= n <= 3)
    assert again > 0.2 * distinct  # ...some of them scanned again by one or two later jobs
    # the first job (an eighth of the trace) reads more blocks once than a 10% cache holds
    job = Counter(h for r in requests[: len(requests) // 8] for h in r.hash_ids)
    assert sum(1 for n in job.values() if n == 1) > 0.1 * distinct


def test_loop_revisits_documents_at_a_fixed_period() -> None:
    requests = generate("loop", 0, 6000)
    seen: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        seen.setdefault(r.hash_ids, []).append(i)
    repeated = [positions for positions in seen.values() if len(positions) >= 3]
    periods = sorted({round((p[-1] - p[0]) / (len(p) - 1), -2) for p in repeated})
    assert len(repeated) > 60
    # the small loop (60 documents, 30% of requests) comes back every ~200 requests; the large
    # one (1,200 documents, half of them) every ~2,400
    assert periods[0] == pytest.approx(200, abs=100) and periods[-1] == pytest.approx(2400, abs=200)


def test_conversation_turns_extend_the_previous_prompt_after_short_and_long_gaps() -> None:
    requests = generate("conversation", 0, 3000)
    by_prefix: dict[tuple[int, ...], float] = {}
    gaps = []
    for r in requests:
        for n in range(len(r.hash_ids) - 1, 6, -1):  # longer than any shared system prompt
            if r.hash_ids[:n] in by_prefix:
                gaps.append(r.timestamp_ms - by_prefix[r.hash_ids[:n]])
                break
        by_prefix[full_blocks(r)] = r.timestamp_ms
    assert len(gaps) > 0.3 * len(requests)
    assert sum(1 for g in gaps if g < 60_000) > 0.2 * len(gaps)
    assert sum(1 for g in gaps if g > 300_000) > 0.2 * len(gaps)


def test_system_prompt_is_shared_by_most_requests() -> None:
    requests = generate("system_prompt", 0, 3000)
    heads = Counter(r.hash_ids[:24] for r in requests if len(r.hash_ids) >= 24)
    (_, shared), = heads.most_common(1)
    assert shared > 0.7 * len(requests)


def test_shift_changes_shape_a_third_of_the_way_through() -> None:
    requests = generate("shift", 0, 3000)
    first, second = requests[:1000], requests[1000:]
    assert not {h for r in first for h in r.hash_ids} & {h for r in second for h in r.hash_ids}
    assert [r.hash_ids for r in first] == [r.hash_ids for r in generate("zipf", 0, 1000)]
