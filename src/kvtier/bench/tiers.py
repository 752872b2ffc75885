"""`kvtier bench tiers`: the tiers against the machine's own limits, side by side.

- dram: TieredStore loads from the DRAM tier into caller buffers (checksums verified)
  vs one numpy copy of the same bytes into a preallocated array; plus the layer
  scatter a connector does (one layer's section of many chunks into random blocks of
  a paged [num_blocks, kv_heads, 2*block, head_size] tensor).
- disk: TieredStore loads from the disk tier with the page cache dropped vs a plain
  sequential read of the same files in the same cache state; /proc/self/io read_bytes
  proves the bytes came from the device.
- hash: default keys from fresh list[int] tokens vs vLLM 0.32's block hash (sha256 of
  pickle((parent, tuple(tokens), extra_keys)) per block), at 128-token chunks; the result
  names the key loop measured ("implementation": keys.KEY_BACKEND, "c" or "python").

Every buffer read into is compared with what was stored; runs alternate order; the
reported numbers are medians.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.common import device_read_bytes, drop_page_cache, median, print_table, write_json
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.keys import KEY_BACKEND, Namespace, chunk_keys
from kvtier.core.layout import KVLayout
from kvtier.store import TieredStore

LAYOUT = KVLayout(num_layers=12, num_kv_heads=8, head_size=128, dtype="float32")
CHUNK_TOKENS = 16  # 1.5 MiB per chunk, 128 KiB per layer section
GB = 1e9


def _keys(n: int, chunk_tokens: int, salt: str) -> list[bytes]:
    root = Namespace(f"bench-{salt}", LAYOUT.layout_id(chunk_tokens)).root()
    rng = random.Random(salt)
    return chunk_keys(root, [rng.randrange(32000) for _ in range(n * chunk_tokens)], chunk_tokens)


def _layer_views(arr: np.ndarray, n: int, layers: int) -> list[list[np.ndarray]]:
    per = arr.reshape(n, layers, -1)
    return [[per[i, j] for j in range(layers)] for i in range(n)]


def _parallel_load(store: TieredStore, keys: list[bytes], dests: list[list[np.ndarray]],
                   parts: int, layers: list[int] | None = None) -> None:
    step = (len(keys) + parts - 1) // parts
    handles = [store.load(keys[i:i + step], dests[i:i + step], layers) for i in range(0, len(keys), step)]
    for h in handles:
        res = h.wait()
        if res.failed:
            raise RuntimeError(f"benchmark load failed for chunks {res.failed[:5]}")


def bench_dram(n: int, runs: int, verify_reads: bool = True) -> dict[str, float]:
    lb = LAYOUT.layer_bytes(CHUNK_TOKENS)
    cb = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, io_threads=2,
                      memory=MemoryTierConfig(capacity_bytes=(n + 1) * cb, verify_reads=verify_reads))
    store = TieredStore(cfg, LAYOUT)
    keys = _keys(n, CHUNK_TOKENS, "dram")
    src = np.random.default_rng(0).integers(0, 256, n * cb, dtype=np.uint8)
    store.save(keys, Namespace("bench-dram", LAYOUT.layout_id(CHUNK_TOKENS)).root(), 0,
               _layer_views(src, n, LAYOUT.num_layers)).wait()
    dst = np.empty_like(src)
    dst_views = _layer_views(dst, n, LAYOUT.num_layers)
    memcpy_dst = np.empty_like(src)
    # paged tensor of the vLLM CPU layout, one per measurement layer; random block ids
    num_blocks = n * 2
    paged = np.empty((num_blocks, LAYOUT.num_kv_heads, 2 * CHUNK_TOKENS, LAYOUT.head_size), dtype=np.float32)
    rng = np.random.default_rng(1)
    read_t, memcpy_t, scatter_t = [], [], []
    for r in range(runs):
        for which in (("kv", "memcpy") if r % 2 == 0 else ("memcpy", "kv")):
            if which == "kv":
                dst.fill(0)
                t0 = time.perf_counter()
                _parallel_load(store, keys, dst_views, parts=2)
                read_t.append(time.perf_counter() - t0)
                if not np.array_equal(dst, src):
                    raise RuntimeError("DRAM tier read returned wrong bytes")
            else:
                memcpy_dst.fill(0)
                t0 = time.perf_counter()
                np.copyto(memcpy_dst, src)
                memcpy_t.append(time.perf_counter() - t0)
                if not np.array_equal(memcpy_dst, src):
                    raise RuntimeError("memcpy baseline is wrong")
        # layer scatter: each layer of every chunk into random blocks of the paged tensor
        total = 0.0
        for layer in range(LAYOUT.num_layers):
            blocks = rng.permutation(num_blocks)[:n]
            dests = [[paged[b]] for b in blocks]
            t0 = time.perf_counter()
            _parallel_load(store, keys, dests, parts=2, layers=[layer])
            total += time.perf_counter() - t0
            want = src.reshape(n, LAYOUT.num_layers, lb)[:, layer]
            if not np.array_equal(paged[blocks].view(np.uint8).reshape(n, lb), want):
                raise RuntimeError("layer scatter returned wrong bytes")
        scatter_t.append(total)
    store.close()
    nbytes = src.nbytes
    read_gbps = nbytes / median(read_t) / GB
    memcpy_gbps = nbytes / median(memcpy_t) / GB
    return {"read_gbps": read_gbps, "memcpy_gbps": memcpy_gbps, "ratio": read_gbps / memcpy_gbps,
            "layer_scatter_gbps": nbytes / median(scatter_t) / GB, "bytes_per_run": nbytes}


def bench_disk(n: int, runs: int, root: Path) -> dict[str, float]:
    cb = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    disk_root = root / "disk"
    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, memory=None, promote_on_hit=False, io_threads=2,
                      disk=DiskTierConfig(root=str(disk_root), capacity_bytes=4 * n * cb))
    store = TieredStore(cfg, LAYOUT)
    keys = _keys(n, CHUNK_TOKENS, "disk")
    src = np.random.default_rng(2).integers(0, 256, n * cb, dtype=np.uint8)
    parent = Namespace("bench-disk", LAYOUT.layout_id(CHUNK_TOKENS)).root()
    views = _layer_views(src, n, LAYOUT.num_layers)
    batch = 64
    for i in range(0, n, batch):
        store.save(keys[i:i + batch], parent if i == 0 else keys[i - 1], i, views[i:i + batch]).wait()
    store.flush()
    files = sorted(str(p) for p in disk_root.rglob("*.kvc"))
    file_bytes = sum(os.path.getsize(f) for f in files)
    dst = np.empty_like(src)
    dst_views = _layer_views(dst, n, LAYOUT.num_layers)
    raw_buf = bytearray(max(os.path.getsize(f) for f in files))
    read_t, raw_t, dev_bytes = [], [], []
    for r in range(runs):
        for which in (("kv", "raw") if r % 2 == 0 else ("raw", "kv")):
            drop_page_cache(files)
            if which == "kv":
                dst.fill(0)
                before = device_read_bytes()
                t0 = time.perf_counter()
                _parallel_load(store, keys, dst_views, parts=2)
                read_t.append(time.perf_counter() - t0)
                dev_bytes.append(device_read_bytes() - before)
                if not np.array_equal(dst, src):
                    raise RuntimeError("disk tier read returned wrong bytes")
            else:
                t0 = time.perf_counter()
                for f in files:
                    with open(f, "rb", buffering=0) as fh:
                        fh.readinto(raw_buf)
                raw_t.append(time.perf_counter() - t0)
    store.close()
    read_gbps = src.nbytes / median(read_t) / GB
    # the raw reader moves whole files (headers and padding too): count its bytes
    raw_gbps = file_bytes / median(raw_t) / GB
    return {"read_gbps": read_gbps, "raw_read_gbps": raw_gbps, "ratio": read_gbps / raw_gbps,
            "bytes_from_device": int(median(dev_bytes)), "payload_bytes": int(src.nbytes),
            "file_bytes": int(file_bytes)}


def _vllm_sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _vllm_hash_block(parent: bytes | None, block_tokens: list[int], extra_keys: tuple | None = None) -> bytes:
    # vLLM 0.32's hash_block_tokens with its default "sha256" hash function
    return _vllm_sha256((parent or _VLLM_NONE_HASH, tuple(block_tokens), extra_keys))


_VLLM_NONE_HASH = hashlib.sha256(b"none").digest()  # stands for vLLM's NONE_HASH, a 32-byte digest


def _baseline_hash(tokens: list[int], chunk: int) -> list[bytes]:
    out = []
    parent = None
    for i in range(0, len(tokens) - len(tokens) % chunk, chunk):
        parent = _vllm_hash_block(parent, tokens[i:i + chunk])
        out.append(parent)
    return out


def bench_hash(runs: int, chunk: int = 128, tokens_per_run: int = 256 * 1024) -> dict[str, Any]:
    rng = random.Random(3)
    root = Namespace("bench-hash", LAYOUT.layout_id(chunk)).root()
    ours: list[float] = []
    base: list[float] = []
    for r in range(runs):
        for which in (("kv", "base") if r % 2 == 0 else ("base", "kv")):
            tokens = [rng.randrange(128256) for _ in range(tokens_per_run)]  # fresh every repetition
            t0 = time.perf_counter()
            keys = chunk_keys(root, tokens, chunk) if which == "kv" else _baseline_hash(tokens, chunk)
            dt = time.perf_counter() - t0
            assert len(keys) == tokens_per_run // chunk
            (ours if which == "kv" else base).append(tokens_per_run / dt)
    return {"chunk_tokens": chunk, "implementation": KEY_BACKEND, "tokens_per_s": median(ours),
            "baseline_tokens_per_s": median(base), "ratio": median(ours) / median(base)}


def run_tiers_bench(json_out: str | None, root: str | None = None, gib: float = 1.0, runs: int = 5) -> dict[str, Any]:
    cb = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    n = max(8, int(gib * (1 << 30)) // cb + 1)
    print(f"kvtier bench tiers: {n} chunks of {cb / 2**20:.2f} MiB ({n * cb / 2**30:.2f} GiB) per measurement, "
          f"{runs} runs, medians")
    base = Path(root) if root else Path("results")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=base))
    from rich.progress import Progress

    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("dram", total=3)
            dram = bench_dram(n, runs)
            # the same reads without re-verifying DRAM sections: what the checksum costs
            unverified = bench_dram(n, runs, verify_reads=False)
            dram["read_gbps_unverified"] = unverified["read_gbps"]
            dram["ratio_unverified"] = unverified["read_gbps"] / dram["memcpy_gbps"]
            progress.update(task, advance=1, description="disk (page cache dropped)")
            disk = bench_disk(n, runs, tmp)
            progress.update(task, advance=1, description="key hashing")
            result = {"dram": dram, "disk": disk, "hash": bench_hash(runs)}
            progress.update(task, advance=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, k, h = result["dram"], result["disk"], result["hash"]
    print_table("kvtier bench tiers", ["measure", "kvtier", "baseline", "ratio", "target"], [
        ["DRAM read GB/s (vs memcpy)", d["read_gbps"], d["memcpy_gbps"], d["ratio"], ">= 0.7"],
        ["DRAM read GB/s, sections not re-verified", d["read_gbps_unverified"], d["memcpy_gbps"], d["ratio_unverified"], ""],
        ["DRAM layer scatter GB/s", d["layer_scatter_gbps"], d["memcpy_gbps"], d["layer_scatter_gbps"] / d["memcpy_gbps"], ""],
        ["disk read GB/s, cache dropped (vs raw)", k["read_gbps"], k["raw_read_gbps"], k["ratio"], ">= 0.7"],
        [f"key hashing M tokens/s, {h['implementation']} loop (vs vLLM-style)", h["tokens_per_s"] / 1e6, h["baseline_tokens_per_s"] / 1e6, h["ratio"], ">= 3"],
    ])
    print(f"disk: {k['bytes_from_device'] / 2**20:.0f} MiB read from the device for {k['payload_bytes'] / 2**20:.0f} MiB of payload")
    write_json(json_out, result)
    return result
