import json
import subprocess
import sys

import numpy as np
import pytest

from kvtier.cli import main
from kvtier.core.config import DiskTierConfig, StoreConfig
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY, payload


def test_store_stats_and_clear(tmp_path, capsys):
    root = tmp_path / "disk"
    store = TieredStore(StoreConfig(chunk_tokens=CHUNK, disk=DiskTierConfig(root=str(root))), TINY)
    r = Namespace("m", TINY.layout_id(CHUNK)).root()
    keys = chunk_keys(r, list(range(12)), CHUNK)
    store.save(keys, r, 0, [payload(k) for k in keys]).wait()
    store.close()
    assert main(["store", "stats", "--root", str(root)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["chunks"] == 3 and stats["corrupt"] == 0
    assert main(["store", "clear", "--root", str(root)]) == 0
    assert "removed 3 chunks" in capsys.readouterr().out
    assert main(["store", "stats", "--root", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["store", "stats", "--root", str(tmp_path / "missing")]) == 2
    assert "kvtier: error:" in capsys.readouterr().err
    (tmp_path / "notkv").mkdir()
    (tmp_path / "notkv" / "precious.txt").write_text("x")
    assert main(["store", "clear", "--root", str(tmp_path / "notkv")]) == 2
    assert (tmp_path / "notkv" / "precious.txt").exists()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "kvtier", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "serve", "proxy", "store", "bench"):
        assert cmd in out.stdout


def test_tiers_bench_hash_part_runs():
    from kvtier.bench.tiers import bench_hash

    r = bench_hash(runs=1, tokens_per_run=4096)
    assert r["chunk_tokens"] == 128 and r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
    assert np.isfinite(r["ratio"])


def test_tiers_bench_dram_and_disk_small(tmp_path):
    from kvtier.bench.tiers import bench_disk, bench_dram

    d = bench_dram(n=8, runs=1)
    assert d["read_gbps"] > 0 and d["memcpy_gbps"] > 0 and d["layer_scatter_gbps"] > 0
    k = bench_disk(n=8, runs=1, root=tmp_path)
    assert k["payload_bytes"] == 8 * 12 * 131072 and k["file_bytes"] > k["payload_bytes"]
    assert k["read_gbps"] > 0 and k["raw_read_gbps"] > 0


def _one_line_error(capsys, *needles):
    """The CLI's stderr is exactly one line naming the problem, and no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_serve_with_a_malformed_config_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "service.yaml"
    bad.write_text("layout: {num_layers: 2\nstore: [\n")
    assert main(["serve", "--config", str(bad), "--socket", str(tmp_path / "kv.sock")]) == 2
    _one_line_error(capsys, "service.yaml", "not valid YAML at line 2")
    assert not (tmp_path / "kv.sock").exists()


def test_serve_with_a_non_finite_number_names_the_key(tmp_path):
    bad = tmp_path / "service.json"
    bad.write_text('{"layout": {"num_layers": 2, "num_kv_heads": 1, "head_size": 8}, "max_lease_s": NaN}')
    # a subprocess with a timeout: were NaN accepted, the service would start and serve forever
    out = subprocess.run([sys.executable, "-m", "kvtier", "serve", "--config", str(bad), "--socket",
                          str(tmp_path / "kv.sock")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_lease_s" in lines[0] and "finite" in lines[0], out.stderr


def test_serve_with_an_unknown_log_level_is_a_usage_error(tmp_path, capsys):
    good = tmp_path / "service.yaml"
    good.write_text("layout: {num_layers: 2, num_kv_heads: 1, head_size: 8}\n")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(good), "--socket", str(tmp_path / "kv.sock"), "--log-level", "loud"])
    assert exc.value.code == 2
    assert "argument --log-level: invalid choice: 'LOUD'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["demo", "--turns", "0"], ["kvtier demo: error: argument --turns", "got 0"]),
        (["demo", "--conversations", "two"], ["argument --conversations", "'two'"]),
        (["demo", "--model", "{tmp}/no-model"], ["argument --model", "no such folder"]),
        (["bench", "trace", "--trace", "{tmp}/missing.jsonl"], ["argument --trace", "no such file"]),
        (["bench", "trace", "--trace", "{tmp}"], ["argument --trace", "not a file"]),
        (["bench", "trace", "--max-requests", "-5"], ["argument --max-requests", "got -5"]),
        (["bench", "tiers", "--gib", "inf"], ["argument --gib", "finite"]),
        (["bench", "tiers", "--runs", "0"], ["argument --runs"]),
        (["bench", "tiers", "--root", "{tmp}/a-file/sub"], ["argument --root", "is a file"]),
        (["bench", "nonsense"], ["invalid choice"]),
        ([], ["required"]),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, needles):
    (tmp_path / "a-file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _one_line_error(capsys, *needles)


def test_malformed_trace_is_one_line_exit_2(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1,\n')
    assert main(["bench", "trace", "--trace", str(trace), "--json", str(tmp_path / "o.json"),
                 "--png", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, "kvtier: error:", "t.jsonl:2", "not valid JSON")


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_unusable_output_path_fails_before_the_run(tmp_path, capsys, option):
    (tmp_path / "a-file").write_text("x")
    assert main(["bench", "ttft", option, str(tmp_path / "a-file" / "out")]) == 2
    _one_line_error(capsys, f"argument {option}", "cannot create the folder")
    assert main(["bench", "ttft", option, str(tmp_path)]) == 2
    _one_line_error(capsys, f"argument {option}", "is a folder")


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import kvtier.cli as cli

    def needs_vllm(args):
        raise ModuleNotFoundError("No module named 'vllm'", name="vllm")

    monkeypatch.setattr(cli, "_cmd_bench_vllm", needs_vllm)
    assert cli.main(["bench", "vllm", "--json", ""]) == 1
    _one_line_error(capsys, "needs vllm", "kvtier[vllm]")


def test_bench_trace_default_is_found_from_any_folder(tmp_path, monkeypatch, capsys):
    import kvtier.bench.trace as trace

    seen = []
    monkeypatch.setattr(trace, "run_trace_bench", lambda path, *a, **k: seen.append(path))
    monkeypatch.setattr(trace, "DEFAULT_TRACE", tmp_path / "shared" / "trace.jsonl")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "trace.jsonl").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["bench", "trace", "--json", "", "--png", ""]) == 0
    assert seen == [str(tmp_path / "shared" / "trace.jsonl")]
    (tmp_path / "shared" / "trace.jsonl").unlink()
    assert main(["bench", "trace", "--json", "", "--png", ""]) == 2
    _one_line_error(capsys, "argument --trace: the default trace", "is missing")


@pytest.mark.parametrize("args", [
    ["demo", "--model", "{empty}", "--quick"],  # a folder that holds no model: a traceback before
    ["bench", "ttft", "--quick", "--repeats", "-1"],  # an AssertionError after building the model before
    ["bench", "ttft", "--quick", "--repeats", "0"],  # silently the default before
    ["bench", "tiers", "--gib", "1e12", "--runs", "1"],  # generated keys for 1e12 GiB before, forever
])
def test_bad_arguments_are_one_line_errors(tmp_path, args):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", *args, "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-800:]


def test_bench_sparse_on_cuda_without_cuda_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "sparse", "--device", "cuda", "--quick",
                        "--json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no CUDA device" in r.stderr, r.stderr[-800:]
