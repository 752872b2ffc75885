"""`kvtier bench vllm` counts hit tokens from measured counters only and checks first tokens
strictly (no engine here: the runner's output is built by hand)."""

from __future__ import annotations

import json

import pytest

from kvtier.bench import vllm as bench


def _phase(name, cached, counters, stats=None, tokens=None):
    requests = [{"ttft_s": 0.1, "token": t, "gap": 1.0, "cached": c}
                for c, t in zip(cached, tokens or [7] * len(cached), strict=True)]
    entry = {"name": name, "measure": True, "requests": requests, "vllm_counters": counters}
    if stats is not None:
        entry["stats"] = {"loaded_tokens_by_tier": stats}
    return entry


def _counters(local, external):
    return {"vllm:prefix_cache_hits": local, "vllm:external_prefix_cache_hits": external}


def _kvtier_run():
    return {"phases": [
        _phase("warmup", [0, 0], _counters(0, 0), stats={}),
        _phase("round0", [100, 60], _counters(40, 120), stats={"memory": 80, "disk": 40}),
    ]}


def test_kvtier_hits_come_from_vllm_and_kvtier_counters():
    checks: dict = {}
    by_source = bench.hit_tokens("kvtier_disk", _kvtier_run(), "warmup", "round0", "kvtier", checks)
    assert by_source == {"vllm_prefix_cache": 40, "kvtier_memory": 80, "kvtier_disk": 40}
    assert checks["kvtier_disk"]["cached_matches_counters"] and checks["kvtier_disk"]["kvtier_matches_external"]
    assert bench.counter_mismatches(checks) == []


def test_vllm_prefix_cache_is_its_own_counter_not_the_remainder():
    run = _kvtier_run()
    run["phases"][1]["vllm_counters"] = _counters(30, 120)  # 10 cached tokens nobody counted
    checks: dict = {}
    by_source = bench.hit_tokens("kvtier_dram", run, "warmup", "round0", "kvtier", checks)
    assert by_source["vllm_prefix_cache"] == 30  # the old subtraction would have said 40
    assert bench.counter_mismatches(checks) == ["kvtier_dram"]


def test_a_connector_other_than_kvtier_is_counted_from_vllms_external_hits():
    run = {"phases": [_phase("repeat_first", [0], _counters(0, 0)), _phase("repeat", [96, 96], _counters(64, 128))]}
    checks: dict = {}
    assert bench.hit_tokens("example_repeat", run, "repeat_first", "repeat", "example_connector", checks) == {
        "vllm_prefix_cache": 64, "example_connector": 128}


def test_missing_vllm_counters_fail_loudly():
    run = _kvtier_run()
    run["phases"][0]["vllm_counters"] = {}
    with pytest.raises(bench.MissingCountersError, match="prefix_cache_hits"):
        bench.hit_tokens("kvtier_dram", run, "warmup", "round0", "kvtier", {})


def test_missing_kvtier_counters_fail_loudly():
    run = _kvtier_run()
    del run["phases"][1]["stats"]
    with pytest.raises(bench.MissingCountersError, match="loaded_tokens_by_tier"):
        bench.hit_tokens("kvtier_dram", run, "warmup", "round0", "kvtier", {})


def test_first_token_check_is_strict_about_request_counts():
    ref = [{"token": 1, "gap": 1.0}, {"token": 2, "gap": 1.0}]
    checks = {"checked": 0, "mismatches": 0}
    bench.first_token_check(ref, [{"token": 1}, {"token": 3}], checks)
    assert checks == {"checked": 2, "mismatches": 1}
    with pytest.raises(ValueError):
        bench.first_token_check(ref, [{"token": 1}], {"checked": 0, "mismatches": 0})


def test_engines_report_their_counters():
    from pathlib import Path

    kwargs = bench._llm_kwargs(Path("/m"), bench.QUICK, 1000)
    assert kwargs["disable_log_stats"] is False  # else LLM.get_metrics() refuses


def test_planner_summary_compares_the_slow_disk_run_with_recomputing():
    out = {"phases": [
        {"name": "warmup", "requests": [], "stats": {"planner_recomputed_chunks": 2}},
        {"name": "round0", "requests": [], "stats": {"planner_recomputed_chunks": 14}},
    ]}
    slow = {"p50_ttft_s": 0.22, "mean_ttft_s": 0.25, "hit_tokens_by_tier": {"kvtier_memory": 64}}
    recompute = {"p50_ttft_s": 0.2, "mean_ttft_s": 0.2}
    p = bench.planner_summary(slow, recompute, out, ["round0"])
    assert p["p50_ratio"] == pytest.approx(1.1) and p["mean_ratio"] == pytest.approx(1.25)
    assert p["planner_recomputed_chunks"] == 12 and p["disk_tokens_loaded"] == 0 and p["met"]
    # a disk hit loaded (or a ratio over the target) is not met
    slow["hit_tokens_by_tier"]["kvtier_disk"] = 32
    assert not bench.planner_summary(slow, recompute, out, ["round0"])["met"]
    slow["hit_tokens_by_tier"] = {}
    slow["p50_ttft_s"] = 0.25
    assert not bench.planner_summary(slow, recompute, out, ["round0"])["met"]


def _out(tokens: list[int], connector: bool) -> dict:
    def phase(name: str, toks: list[int]) -> dict:
        p = {"name": name, "measure": name != "warmup",
             "requests": [{"ttft_s": 0.1, "token": t, "gap": 1.0, "cached": 0, "prompt_tokens": 10} for t in toks],
             "vllm_counters": {"vllm:prefix_cache_hits": 0, "vllm:external_prefix_cache_hits": 0}}
        if connector:
            p["stats"] = {"loaded_tokens_by_tier": {}}
        return p

    return {"init_s": 1.0, "phases": [phase("warmup", tokens[:3]), phase("round0", tokens[3:])]}


def test_a_first_token_mismatch_names_its_run(tmp_path):
    """The first-token check was one count over every pair, and `kvtier bench vllm` exited 0
    whatever it said: a kvtier run that served another token than vLLM alone was not named."""
    good, bad = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 6]
    outs = {"apc_small": _out(good, False), "apc_ample": _out(good, False), "kvtier_dram": _out(bad, True)}
    res = bench._report(outs, bench.QUICK, str(tmp_path / "r.json"), tmp_path, [10])
    details = res["details"]
    assert details["first_token_check"] == {"checked": 12, "mismatches": 1}
    assert details["first_token_mismatch_runs"] == ["kvtier_dram"]
    assert details["first_token_checks"]["kvtier_dram"] == {"reference": "apc_small", "checked": 6, "mismatches": 1}
    assert details["first_token_checks"]["apc_ample"]["mismatches"] == 0


def test_p90_is_the_nearest_rank():
    rows = [{"ttft_s": float(i)} for i in range(1, 11)]
    assert bench._summary(rows, {})["p90_ttft_s"] == 9.0  # 10.0 before (round half to even)
    assert bench._summary(rows[:1], {})["p90_ttft_s"] == 1.0


def test_read_from_device_needs_a_tenth_of_the_loaded_bytes():
    from kvtier.bench.common import read_from_device

    assert read_from_device(0, 8 << 20) is False  # tmpfs, or a page cache that was not dropped
    assert read_from_device((8 << 20) // 10 - 1, 8 << 20) is False
    assert read_from_device((8 << 20) // 10, 8 << 20) is True
    assert read_from_device(9 << 20, 8 << 20) is True
    assert read_from_device(None, 8 << 20) is None  # unknown
    assert read_from_device(0, 0) is None  # nothing loaded from disk: nothing to check


def _disk_run_out(device_bytes):
    out = _out([1, 2, 3, 4, 5, 6], True)
    out["phases"][1]["stats"] = {"loaded_tokens_by_tier": {"disk": 512, "memory": 64}}
    out["phases"][1]["vllm_counters"]["vllm:external_prefix_cache_hits"] = 576
    for r, cached in zip(out["phases"][1]["requests"], (512, 64, 0), strict=True):
        r["cached"] = cached
    out["disk_device_read_bytes"] = device_bytes
    return out


@pytest.mark.parametrize("device_bytes,verdict", [(0, False), (40 << 20, True), (None, None)])
def test_kvtier_disk_did_not_check_that_its_disk_hits_read_the_device(tmp_path, capsys, device_bytes, verdict):
    """bench vllm's kvtier_disk called every hit of its disk tier a disk read, even where the
    folder was on tmpfs or the page cache kept the files: the store service's device reads over
    the measured rounds are now in the JSON, and a warning says when they are (almost) nothing."""
    good = [1, 2, 3, 4, 5, 6]
    outs = {"apc_small": _out(good, False), "kvtier_disk": _disk_run_out(device_bytes)}
    res = bench._report(outs, bench.QUICK, str(tmp_path / "r.json"), tmp_path, [10])
    entry = res["kvtier_disk"]
    loaded = 512 * bench.QUICK.kv_bytes_per_token
    assert entry["hit_tokens_by_tier"]["kvtier_disk"] == 512
    assert entry["disk_device_read_bytes"] == device_bytes and entry["disk_loaded_bytes"] == loaded
    assert entry["disk_read_from_device"] is verdict
    printed = capsys.readouterr().out
    assert (f"kvtier_disk's disk hits read 0 bytes from a block device for {loaded} loaded" in printed) == (
        verdict is False)
    assert "disk_device_read_bytes" not in res["apc_small"]


def _fake_service(tmp_path, pid):
    sock = str(tmp_path / "kv.sock")
    (tmp_path / "kv.sock.lock").write_text(f"{pid}\n")
    stats = tmp_path / "stats.json"
    stats.write_text('{"loaded_tokens_by_tier": {"disk": 64}}')
    return sock, stats


def test_service_reads_count_from_the_end_of_the_warmup(tmp_path):
    """The runner's read of the warm-up's stats (a FIFO) is when the count starts: a read of the
    device before it is not counted, one after it is (this process plays the service)."""
    import os

    from kvtier.bench.common import device_read_bytes, drop_page_cache

    sock, stats = _fake_service(tmp_path, os.getpid())
    files = []
    for name in ("warmup.bin", "measured.bin"):
        (tmp_path / name).write_bytes(os.urandom(4 << 20))
        files.append(tmp_path / name)
    drop_page_cache(files)
    before = device_read_bytes()
    files[0].read_bytes()  # the warm-up's read: not counted
    if device_read_bytes() - before < 4 << 20:
        pytest.skip("the test folder is not on a block device whose page cache can be dropped")
    reads = bench.ServiceDeviceReads(sock, str(stats), tmp_path / "warmup.fifo")
    with open(reads.fifo) as f:  # as the runner does at the end of the warm-up
        assert json.load(f) == {"loaded_tokens_by_tier": {"disk": 64}}
    files[1].read_bytes()  # a measured round's read
    counted = reads.stop()
    assert counted is not None and 4 << 20 <= counted < 8 << 20
    assert not reads.fifo.exists()


def test_service_reads_are_unknown_without_a_warmup_end_or_a_service(tmp_path):
    import os

    sock, stats = _fake_service(tmp_path, os.getpid())
    assert bench.ServiceDeviceReads(sock, str(stats), tmp_path / "a.fifo").stop() is None  # the runner died first
    (tmp_path / "kv.sock.lock").unlink()  # no service: no pid
    reads = bench.ServiceDeviceReads(sock, str(stats), tmp_path / "b.fifo")
    with open(reads.fifo) as f:
        assert json.load(f)["loaded_tokens_by_tier"] == {"disk": 64}  # the runner still gets its stats
    assert reads.stop() is None
