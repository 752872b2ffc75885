"""`kvtier bench service` verifies every timed pass and exits non-zero when any fails."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

import kvtier.bench.service as service_bench
from kvtier.cli import main as cli_main


class _SwapsChunksOnOneLoad:
    """A store client that loads chunks 0 and 1 into each other's buffers on its n-th load:
    every byte passes the store's checksums, but the pass holds the wrong chunks."""

    def __init__(self, inner: Any, bad_load: int) -> None:
        self._inner = inner
        self._bad_load = bad_load
        self._loads = 0

    def load(self, keys, dests, *args, **kwargs):
        self._loads += 1
        if self._loads == self._bad_load:
            dests = [dests[1], dests[0], *dests[2:]]
        return self._inner.load(keys, dests, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def swap_in_middle_pass(monkeypatch):
    real_connect = service_bench.connect

    def connect(*args, **kwargs):
        return _SwapsChunksOnOneLoad(real_connect(*args, **kwargs), bad_load=2)  # pass 2 of 3, not the last

    monkeypatch.setattr(service_bench, "connect", connect)
    small = functools.partial(service_bench.run_service_bench, chunks=8, runs=3, lookup_seconds=0.05)
    monkeypatch.setattr(service_bench, "run_service_bench", small)


def test_a_clean_run_verifies_every_pass(tmp_path):
    result = service_bench.run_service_bench(tmp_path / "r.json", chunks=8, runs=3, lookup_seconds=0.05)
    assert result["verified"] is True
    assert result["verified_runs"] == {"service": [True] * 3, "inprocess": [True] * 3}
    assert service_bench.exit_status(result) == 0


def test_a_wrong_middle_pass_makes_the_command_fail(tmp_path, swap_in_middle_pass):
    out = tmp_path / "r.json"
    assert cli_main(["bench", "service", "--json", str(out)]) == 1
    saved = json.loads(out.read_text())
    assert saved["verified"] is False
    assert saved["verified_runs"] == {"service": [True, False, True], "inprocess": [True, True, True]}


def test_metrics_overhead_interleaves_verified_runs_of_both_services(tmp_path, monkeypatch):
    import kvtier.bench.metrics_overhead as overhead

    small = functools.partial(overhead.run_metrics_overhead, chunks=8, runs=3, load_batch=4, lookup_batch=8,
                              lookup_seconds=0.06, slices=2)
    monkeypatch.setattr(overhead, "run_metrics_overhead", small)
    out = tmp_path / "overhead.json"
    assert cli_main(["bench", "service", "--metrics-overhead", "--rounds", "2", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["verified"] is True and saved["runs"] == 3 and len(saved["rounds"]) == 2
    for r in saved["rounds"]:
        assert r["verified_runs"] == {"on": [True] * 3, "off": [True] * 3}
        for series in ("lookup_chunks_per_s", "load_bytes_per_s"):
            runs = r[series]["runs"]
            assert len(runs["on"]) == len(runs["off"]) == 3 and min(runs["on"] + runs["off"]) > 0
        assert r["lookup_ratio"] == r["lookup_chunks_per_s"]["median"]["on"] / r["lookup_chunks_per_s"]["median"]["off"]
    assert saved["load_ratios"] == [r["load_ratio"] for r in saved["rounds"]]
