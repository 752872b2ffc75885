import json
import subprocess
import sys

import numpy as np

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
    for cmd in ("demo", "serve", "store", "bench"):
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
