"""The fleet benchmark's real-payload part: two `kvtier serve` processes, standing for two hosts,
over one shared folder.

Each service has its own socket and its own shared-memory DRAM pool, and the same shared-folder
lower tier (`store.lower_tiers: [{shared_folder: ...}]`): host A owns the folder, host B does not.
Chunks are saved through A's service, A's store writes them to the folder in the background; B's
service finds them at its next lookup (no restart) and loads them through its own pool into this
process's buffers, where every byte is compared with what A saved. Reported: how long B waited
to see the whole chain, the load's bandwidth from the folder (promoting into B's DRAM) and again
from B's DRAM, and which tier served each chunk.

The Redis payload figures (`load_ratio`, `lookups_per_s`) are helper "redis"'s
kvtier.bench.redis: `redis_payload()` runs it when that module exists and says so when not.
"""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.common import drop_folder_cache
from kvtier.core.layout import KVLayout

LAYOUT = KVLayout(num_layers=12, num_kv_heads=8, head_size=128, dtype="float32")
CHUNK_TOKENS = 16
REDIS_PAYLOAD = ("kvtier.bench.redis", "run_redis_payload")  # (module, function) of the Redis figures


def shared_folder_lower_tiers_available() -> bool:
    """Whether StoreConfig.lower_tiers accepts a `shared_folder` entry in this build."""
    try:
        from kvtier.core.config import LowerTierConfig  # type: ignore[attr-defined]
    except ImportError:  # a build before StoreConfig.lower_tiers
        return False
    return any(f.name == "shared_folder" for f in fields(LowerTierConfig))


def _service_config(folder: Path, name: str, root: Path, owner: bool, chunks: int, layout: KVLayout) -> Path:
    pool = chunks * layout.chunk_bytes(CHUNK_TOKENS)
    cfg = {
        "layout": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                   "head_size": layout.head_size, "dtype": layout.dtype, "planes": layout.planes},
        "store": {"chunk_tokens": CHUNK_TOKENS, "memory": {"capacity_bytes": pool},
                  "lower_tiers": [{"shared_folder": {"root": str(root), "owner": owner, "rescan_s": 0,
                                                     "revalidate_s": 0}}]},
        "socket_path": str(folder / f"{name}.sock"),
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kvtier.service", "--config", str(config), "--log-level", "WARNING"])


def _payload(i: int, layout: KVLayout) -> np.ndarray:
    """[layers, layer_bytes] of chunk i, derived from i alone."""
    lb = layout.layer_bytes(CHUNK_TOKENS)
    return np.random.default_rng(1000 + i).integers(0, 256, (layout.num_layers, lb), dtype=np.uint8)


def run_payload(chunks: int = 64, layout: KVLayout = LAYOUT, quiet: bool = False,
                timeout_s: float = 60.0) -> dict[str, Any]:
    """Save `chunks` through host A's service, load them through host B's; verify every byte."""
    if not shared_folder_lower_tiers_available():
        return {"skipped": "StoreConfig.lower_tiers has no shared_folder kind in this build"}
    from kvtier.bench.service import _wait_for_socket
    from kvtier.client import connect

    folder = Path(tempfile.mkdtemp(prefix="kvtier-fleet-", dir="/tmp"))
    root = folder / "shared"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        configs = {"a": _service_config(folder, "a", root, True, chunks, layout),
                   "b": _service_config(folder, "b", root, False, chunks, layout)}
        for name in ("a", "b"):
            procs.append(_start(configs[name]))
            _wait_for_socket(str(folder / f"{name}.sock"), procs[-1])
        a = connect({"mode": "service", "socket_path": str(folder / "a.sock")}, layout=layout)
        b = connect({"mode": "service", "socket_path": str(folder / "b.sock")}, layout=layout)
        ns = a.namespace("bench-fleet")
        keys = a.chunk_keys(ns.root(), list(range(chunks * CHUNK_TOKENS)))
        payloads = [_payload(i, layout) for i in range(chunks)]
        assert b.lookup(keys).hits == 0
        t0 = time.perf_counter()
        saved = a.save(keys, ns.root(), 0, [list(p) for p in payloads]).wait()
        a.flush()  # the folder writes are background work: wait for them
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        seen = b.lookup(keys).hits
        while seen < chunks and time.perf_counter() - t0 < timeout_s:
            time.sleep(0.01)
            seen = b.lookup(keys).hits
        seen_s = time.perf_counter() - t0
        dest = np.zeros((chunks, layout.num_layers, layout.layer_bytes(CHUNK_TOKENS)), dtype=np.uint8)
        dests = [list(dest[i]) for i in range(chunks)]
        drop_folder_cache(root)  # host A wrote them here: host B's read must not find them in memory
        t0 = time.perf_counter()
        first = b.load(keys, dests).wait()
        folder_load_s = time.perf_counter() - t0
        verified_folder = all(np.array_equal(dest[i], payloads[i]) for i in range(chunks))
        dest.fill(0)
        t0 = time.perf_counter()
        second = b.load(keys, dests).wait()
        dram_load_s = time.perf_counter() - t0
        verified_dram = all(np.array_equal(dest[i], payloads[i]) for i in range(chunks))
        a.close()
        b.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
    total = chunks * layout.chunk_bytes(CHUNK_TOKENS)
    result: dict[str, Any] = {
        "hosts": 2,
        "chunks": chunks,
        "chunk_bytes": layout.chunk_bytes(CHUNK_TOKENS),
        "saved_in_dram_a": saved.in_memory,
        "save_and_flush_s": save_s,
        "found_by_b": seen,
        "found_by_b_after_s": seen_s,
        "loaded_by_b": first.loaded,
        "first_load_tiers": sorted(set(first.tiers)),
        "first_load_gbps": total / folder_load_s / 1e9,
        "second_load_tiers": sorted(set(second.tiers)),
        "second_load_gbps": total / dram_load_s / 1e9,
        "verified": bool(verified_folder and verified_dram and first.loaded == chunks and second.loaded == chunks),
    }
    if not quiet:
        print(f"fleet payload: {chunks} chunks of {result['chunk_bytes'] / 2**20:.2f} MiB saved through host A, "
              f"found by host B after {seen_s * 1e3:.0f} ms, loaded from {result['first_load_tiers']} at "
              f"{result['first_load_gbps']:.2f} GB/s, then from {result['second_load_tiers']} at "
              f"{result['second_load_gbps']:.2f} GB/s; verified: {result['verified']}", file=sys.stderr)
    return result


def redis_payload(quiet: bool = False) -> dict[str, Any]:
    """Helper "redis"'s payload figures, when its module is in this build; else why not."""
    module, function = REDIS_PAYLOAD
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return {"skipped": f"{module} is not in this build ({e})"}
    run = getattr(mod, function, None)
    if run is None:
        return {"skipped": f"{module} has no {function}(); wire its payload run in REDIS_PAYLOAD"}
    return dict(run(quiet=quiet))


__all__ = ["redis_payload", "run_payload", "shared_folder_lower_tiers_available"]
