"""`kvtier bench sparse --device`: the device rows on the CPU (tiny shape), their keys, flag errors."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from kvtier.bench.sparse_device import Plan, device_rows, llama_shapes, parse_device  # noqa: E402
from kvtier.cli import main  # noqa: E402

DECODE_KEYS = {"context_tokens", "budget_tokens", "drift", "retrieval_churn", "dense_token_ms", "sparse_token_ms",
               "dense_kv_gpu_bytes", "sparse_kv_gpu_bytes"}


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    """Shorter contexts and fewer steps than --quick's (the keys and the code path are the same)."""
    real = Plan.__init__

    def small(self, device, shape, quick, prefetch_blocks=None):
        real(self, device, shape, quick, prefetch_blocks)
        # 2048 tokens at a 1/16 budget: 8 blocks of 16, 4 of them retrieved
        self.decode_contexts, self.prefill_contexts, self.steps = (2048,), (256,), 3

    monkeypatch.setattr(Plan, "__init__", small)


def test_cli_quick_cpu_tiny_reports_the_device_and_every_key(tmp_path) -> None:
    out = tmp_path / "s.json"
    before = torch.get_num_threads()
    assert main(["bench", "sparse", "--quick", "--device", "cpu", "--shape", "tiny", "--json", str(out)]) == 0
    assert torch.get_num_threads() == before
    data = json.loads(out.read_text())
    assert data["setup"]["device"] == "cpu"
    assert data["setup"]["shape"] == "tiny" and data["setup"]["dtype"] == "float32"
    assert [r["drift"] for r in data["gpu_decode"]] == [0.0, 0.98]
    for row in data["gpu_decode"]:
        assert DECODE_KEYS <= set(row)
        assert row["dense_token_ms"] > 0 and row["sparse_token_ms"] > 0
        assert row["budget_tokens"] < row["context_tokens"]
        assert 0.0 <= row["retrieval_churn"] <= 1.0
        # GPU memory peaks exist only on CUDA: never filled in on the CPU
        assert row["dense_kv_gpu_bytes"] is None and row["sparse_kv_gpu_bytes"] is None
        assert row["sparse_unaccounted_before_decode_bytes"] is None
        # one traced step after the timed ones: its transients by allocating function (sparse attention's among them)
        traced = row["sparse_traced_step"]
        assert traced["transient_peak_bytes"] > 0 and traced["cuda_peak_over_before_bytes"] is None
        assert sum(traced["at_peak"].values()) <= traced["transient_peak_bytes"]
    (pre,) = data["prefill"]
    assert pre["context_tokens"] == 256 and pre["dense_s"] > 0 and pre["sparse_s"] > 0
    assert set(data["max_context"]) >= {"gpu_memory_cap_bytes", "dense_max_tokens", "sparse_completed_tokens"}
    assert set(data["batched"]) >= {"context_tokens", "dense_batch", "sparse_batch", "dense_tokens_per_s",
                                    "sparse_tokens_per_s"}
    assert "CUDA" in data["max_context"]["skipped"] and data["batched"]["dense_batch"] is None


def test_a_moving_selection_is_counted_as_churn() -> None:
    rows = device_rows("cpu", "tiny", "float32", quick=True)["gpu_decode"]
    assert rows[0]["retrieval_churn"] > 0.0  # random weights: greedy steps reselect blocks


def test_shapes_are_the_ttft_bench_ones() -> None:
    assert {"tiny", "llama-1b", "llama-8b"} <= set(llama_shapes())
    assert llama_shapes()["llama-8b"]["kv_heads"] == 8


def test_bad_device_and_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="--device 'tpu'"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_device("cuda")
    with pytest.raises(ValueError, match="--shape 'huge'"):
        device_rows("cpu", "huge")
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        device_rows("cpu", "tiny", "int8")


def test_the_cuda_only_rows_run_with_cuda_memory_calls_mocked(monkeypatch) -> None:
    """max_context and batched need CUDA; here their code runs on the CPU with torch.cuda's memory
    calls stubbed (no cap is enforced, so both complete): what a GPU session runs has no slip that
    only a GPU would find. The numbers mean nothing on the CPU and are not checked."""
    from kvtier.bench import sparse_device as sd
    from kvtier.connectors.transformers.sparse import register

    class Props:
        total_memory = 1 << 34

    caps: list[float] = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())

    def set_fraction(f: float, device: object = None) -> None:
        # as torch does on a GPU: a torch.device("cuda") without an index is refused (the H200 run's crash)
        if not isinstance(device, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        caps.append(f)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    register()
    device = torch.device("cpu")
    plan = sd.Plan(device, "tiny", quick=True)
    plan.cap_context, plan.batched_context, plan.steps = 256, 512, 3
    model = sd.build_model("tiny", device, torch.float32, 4096)
    mc = sd.max_context_row(model, plan, device, 1 << 20, quick=True)
    assert mc["contexts_tried"] == [256, 512] and mc["dense_max_tokens"] == mc["sparse_completed_tokens"] == 512
    assert mc["failures"] == {}
    b = sd.batched_row(model, plan, device, 1 << 20)
    assert b["dense_batch"] == 4 and 1 <= b["sparse_batch"] <= 8
    assert b["dense_tokens_per_s"] > 0 and b["sparse_tokens_per_s"] > 0
    assert caps[-1] == 1.0  # every cap is lifted afterwards


def test_prefetch_blocks_reach_the_rows_and_each_row_is_reported_as_it_ends() -> None:
    seen: list[tuple[int, int]] = []
    out = device_rows("cpu", "tiny", "float32", quick=True, prefetch_blocks=2,
                      on_row=lambda partial: seen.append((len(partial["gpu_decode"]), len(partial.get("prefill", [])))))
    assert out["setup"]["prefetch_blocks"] == 2
    assert seen == [(1, 0), (2, 0), (2, 1)]  # two decode rows, then the prefill row
    for row in out["gpu_decode"]:
        assert row["prefetch_blocks"] == 2 and 0 <= row["prefetch_used_slices"] <= row["prefetched_slices"]
    assert sum(r["prefetched_slices"] for r in out["gpu_decode"]) > 0


def test_runs_names_the_out_of_memory_that_stopped_a_run(monkeypatch) -> None:
    from kvtier.bench import sparse_device as sd

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert sd._runs(lambda: None) is None
    assert sd._runs(oom) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
