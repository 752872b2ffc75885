"""`kvtier bench ttft`: fair columns (warm, same runs, same statistic), the throttle, the device options."""

from __future__ import annotations

import json

import pytest
import torch

from kvtier.bench import ttft
from kvtier.bench.common import median
from kvtier.cli import build_parser
from kvtier.core.errors import ConfigError

CASE_KEYS = ("prompt_tokens", "no_kvtier_s", "miss_s", "dram_hit_s", "disk_hit_s", "dram_floor_s", "disk_floor_s",
             "reduction_dram", "reduction_disk", "miss_published_s", "load_only_s", "load_gbps", "max_logit_diff",
             "top1_equal", "top1_decisive")
RUN_LISTS = {"no_kvtier_s": "no_kvtier_runs_s", "miss_s": "miss_runs_s", "miss_published_s": "miss_published_runs_s",
             "dram_hit_s": "dram_hit_runs_s", "disk_hit_s": "disk_hit_runs_s", "load_only_s": "load_only_runs_s"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One small run, recording every plain forward's prompt (the warm-up must come first)."""
    from kvtier.store.planner import ESTIMATES

    ESTIMATES.forget()
    plain_calls: list[torch.Tensor] = []
    real_plain = ttft._Runner.plain

    def spy(self, ids):
        plain_calls.append(ids)
        return real_plain(self, ids)

    mp = pytest.MonkeyPatch()
    mp.setattr(ttft._Runner, "plain", spy)
    try:
        out = tmp_path_factory.mktemp("ttft") / "ttft.json"
        result = ttft.run_ttft_bench(str(out), quick=True, lengths=[64, 128], repeats=3)
    finally:
        mp.undo()
    return result, json.loads(out.read_text()), plain_calls


def test_json_has_every_key(quick_run):
    result, data, _ = quick_run
    assert data["cases"] == result["cases"] and len(data["cases"]) == 2
    for case, detail in zip(data["cases"], data["details"]):
        assert set(CASE_KEYS) <= set(case)
        assert {"chunks_loaded", "chunks_recomputed", "dram_chunks_loaded", "dram_chunks_recomputed",
                "disk_device_read_bytes"} <= set(detail)
        assert case["top1_equal"] is True and case["max_logit_diff"] < 1e-3
        assert isinstance(case["top1_decisive"], bool)
        assert case["miss_published_s"] >= case["miss_s"] > 0
    for key in ("device", "shape", "dtype", "repeats", "memcpy_bytes_per_s", "disk_read_bytes_per_s"):
        assert key in data["setup"]
    assert data["setup"]["device"] == "cpu" and "h2d_pinned_gbps" not in data["setup"]


def test_every_column_is_the_median_of_the_same_number_of_runs(quick_run):
    _, data, _ = quick_run
    for case, detail in zip(data["cases"], data["details"]):
        for column, runs in RUN_LISTS.items():
            assert len(detail[runs]) == 3, column
            assert case[column] == pytest.approx(median(detail[runs])), column


def test_the_plain_baseline_is_not_the_first_forward(quick_run):
    """Regression (issue 16): no_kvtier was the model's first forward ever, cold, while hits were warm."""
    _, data, calls = quick_run
    for n in (64, 128):
        same_length = [ids for ids in calls if ids.shape[1] == n]
        assert len(same_length) >= 1 + 3  # the warm-up, then the timed runs
        warm, measured = same_length[0], same_length[-1]
        assert not torch.equal(warm, measured)  # the first forward of this length warms up another prompt


def test_unthrottled_disk_hits_load_chunks(quick_run):
    _, data, _ = quick_run
    for detail in data["details"]:
        assert detail["disk_chunks_loaded_runs"][0] > 0  # the first disk hit: probed bandwidth, chunks load


def test_throttled_disk_is_recomputed(tmp_path):
    result = ttft.run_ttft_bench(str(tmp_path / "t.json"), quick=True, lengths=[64, 128], repeats=3,
                                 throttle_disk_gbps=0.002)
    assert result["setup"]["throttle_disk_gbps"] == 0.002
    for case, detail in zip(result["cases"], result["details"]):
        assert detail["chunks_loaded"] == 0 and detail["disk_chunks_loaded_runs"] == [0, 0, 0]
        assert detail["chunks_recomputed"] == (case["prompt_tokens"] - 1) // 16
        assert detail["disk_chunks_read"] == [0, 0, 0]
        assert case["top1_equal"] is True
    # only the disk is throttled: DRAM's estimate is measured (whether its loads pay at 64 tokens is the
    # planner's call on timings this noisy machine makes, so the DRAM hit's chunk count is not asserted)
    sources = {tier.split("->")[0].split(":")[0]: est["source"] for tier, est in result["setup"]["estimates"].items()
               if "->" in tier}
    assert sources["disk"] == "throttle" and sources["memory"] != "throttle"


def test_cpu_tiny_shape_runs(tmp_path):
    result = ttft.run_ttft_bench(str(tmp_path / "t.json"), device="cpu", shape="tiny", lengths=[48], repeats=1)
    setup = result["setup"]
    assert (setup["device"], setup["shape"], setup["dtype"]) == ("cpu", "tiny", "float32")
    assert (setup["direct_loads"], setup["direct_saves"]) == (False, False)  # both only on CUDA by default
    assert [c["prompt_tokens"] for c in result["cases"]] == [48]


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="tpu"), "--device"),
    (dict(shape="llama-70b"), "--shape"),
    (dict(dtype="fp8"), "--dtype"),
    (dict(throttle_disk_gbps=0.0), "--throttle-disk-gbps"),
    (dict(lengths=[1]), "--lengths"),
])
def test_bad_options_name_the_flag(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ttft.run_ttft_bench(None, quick=True, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        ttft.run_ttft_bench(None, device="cuda", shape="llama-8b")


def test_cli_flags():
    args = build_parser().parse_args(["bench", "ttft", "--device", "cuda", "--shape", "llama-8b", "--dtype",
                                      "bfloat16", "--lengths", "8192,32768", "--throttle-disk-gbps", "0.5",
                                      "--repeats", "3"])
    assert (args.device, args.shape, args.dtype, args.lengths, args.throttle_disk_gbps, args.repeats) == (
        "cuda", "llama-8b", "bfloat16", [8192, 32768], 0.5, 3)


def test_top1_agreement_ignores_near_ties():
    ref = torch.tensor([[1.0, 0.9995, 0.0], [3.0, 1.0, 0.0]])
    assert ttft.top1_agrees(ref, torch.tensor([[0.9995, 1.0, 0.0], [3.0, 1.0, 0.0]]), 1e-3)  # row 0: a near tie
    assert not ttft.top1_agrees(ref, torch.tensor([[1.0, 0.9, 0.0], [1.0, 3.0, 0.0]]), 1e-3)


def test_floors():
    assert ttft._floor(10**9, 1e9, 0.5, 10.0, cuda=False) == pytest.approx(1.5)  # load then compute
    assert ttft._floor(10**9, 1e9, 0.5, 10.0, cuda=True) == pytest.approx(1.0)  # overlapped: the larger
    assert ttft._floor(10**9, 1e6, 0.5, 2.0, cuda=False) == 2.0  # never above recomputing


def test_pool_copy_probe_runs_the_direct_load_steps_on_any_device():
    """The CUDA setup diagnostic (the store pool's copy speed, alone and beside its checksums), run
    here on the CPU: every figure is measured and positive, over whole pieces of the pool."""
    from kvtier.bench.ttft import pool_copy_probe
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.core.layout import KVLayout
    from kvtier.store.tiered import TieredStore

    store = TieredStore(StoreConfig(chunk_tokens=16, memory=MemoryTierConfig(capacity_bytes=9 << 20)),
                        KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float32"))
    try:
        got = pool_copy_probe(store, "cpu", nbytes=8 << 20, piece=1 << 20, runs=2)
        assert got["bytes"] == 8 << 20 and got["piece_bytes"] == 1 << 20 and got["pool_is_pinned"] is False
        assert all(got[k] > 0 for k in ("one_copy_gbps", "pieces_gbps", "pieces_with_checksums_gbps",
                                         "checksums_alone_gbps"))
        with pytest.raises(ValueError, match="smaller than one"):
            pool_copy_probe(store, "cpu", nbytes=8 << 20, piece=64 << 20)
    finally:
        store.close()


def test_top1_equal_says_when_it_compared_nothing() -> None:
    """top1_equal's tolerance is the run's own max_logit_diff (issue 17's definition): logits far off
    leave no row decisive and top1_equal true. top1_decisive says whether anything was compared."""
    import torch

    ref = torch.tensor([[5.0, 1.0, 0.0]])
    garbage = torch.tensor([[0.0, 0.0, 9.0]])
    diff = float((ref - garbage).abs().max())
    assert ttft.top1_agrees(ref, garbage, diff) is True and ttft.top1_decisive(ref, diff) is False
    assert ttft.top1_agrees(ref, garbage, 1e-3) is False and ttft.top1_decisive(ref, 1e-3) is True


def test_reopened_stores_share_one_pool_locked_once(tmp_path, monkeypatch) -> None:
    """The runner reopens its store about 15 times a run. Every store keeps its slots in the runner's
    one pool, and on CUDA the runner holds the pool's page-lock from start to close, so a reopen
    neither unregisters nor registers it again (CUDA's calls are faked here; what they are asked is
    what counts). A reopened store finds nothing of the one before."""
    from kvtier.bench.models import random_llama
    from kvtier.connectors import copy_engine
    from kvtier.connectors.transformers import model_layout

    calls: list[tuple[str, int]] = []
    registry = copy_engine.HostRegistry(register=lambda a, n: calls.append(("register", a)),
                                        unregister=lambda a: calls.append(("unregister", a)))
    monkeypatch.setattr(copy_engine, "_host_registry", registry)
    model = random_llama(**ttft._sizes(True, "cpu", None)["model"])
    model.to(torch.float32)
    layout = model_layout(model)
    bench = ttft._Runner(model, layout, tmp_path / "store", 16, 4 << 20, "cuda", None)
    bench.cuda = False  # the calls below run on the CPU; only the pool's page-lock is CUDA's here
    address = int(bench.pool.ctypes.data)
    try:
        bench.store.watch_pool(registry)  # what page_lock_pool does on CUDA for each connector's store
        assert bench.store.memory.pool_region().address == address
        ids = torch.randint(3, model.config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
        bench.through(ids)
        bench.store.flush()
        for clear in (False, True):
            bench.reopen(clear=clear)
            bench.store.watch_pool(registry)
            assert bench.store.memory.pool_region().address == address
            assert bench.store.memory.keys() == []  # the pool's old bytes are nobody's chunks
        assert bench.miss(ids)[0] > 0  # asserts that the emptied store found nothing
        assert calls == [("register", address)]
    finally:
        bench.close()
    assert calls == [("register", address), ("unregister", address)]
    assert registry.registered() == {}
