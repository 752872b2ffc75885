"""`kvtier bench tiers`: the tiers against the machine's own limits, side by side.

kvtier's loads run on IO_THREADS threads (the store's io_threads, each load split in as
many parts); each baseline runs with one thread and with IO_THREADS threads splitting the
same bytes, and the faster of the two is the baseline (both are in the JSON). Every ratio
divides numbers measured in the same call.
- dram: TieredStore loads from the DRAM tier into caller buffers, with sections verified
  (checksums) and, from a second store of the same bytes, not re-verified, vs numpy copies
  of the same bytes into a preallocated array; plus the layer scatter a connector does (one
  layer's section of many chunks into random blocks of a paged
  [num_blocks, kv_heads, 2*block, head_size] tensor).
- disk: TieredStore loads from the disk tier with the page cache dropped vs plain
  sequential reads of the same files in the same cache state; /proc/self/io read_bytes
  proves the bytes came from the device.
- hash: default keys from fresh list[int] tokens vs vLLM's block hash at 128-token chunks:
  vLLM's own hash_block_tokens with its default prefix-caching hash when vLLM is importable,
  else a re-creation of vLLM 0.32's (sha256 of pickle((parent, tuple(tokens), extra_keys))
  per block); the result names the baseline and the key loop measured ("implementation":
  keys.KEY_BACKEND, "c" or "python").

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.common import device_read_bytes, drop_page_cache, median, print_table, write_json
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.errors import ConfigError
from kvtier.core.keys import KEY_BACKEND, ChunkKey, Namespace, chunk_keys
from kvtier.core.layout import KVLayout
from kvtier.store import TieredStore

LAYOUT = KVLayout(num_layers=12, num_kv_heads=8, head_size=128, dtype="float32")
CHUNK_TOKENS = 16  # 1.5 MiB per chunk, 128 KiB per layer section
GB = 1e9
IO_THREADS = 2  # kvtier's I/O threads in these measurements, and the most threads a baseline gets


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    step = -(-total // parts)
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def _threaded_copy(pool: ThreadPoolExecutor | None, dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """np.copyto of `src` into `dst` in `threads` contiguous parts, one per thread (it releases the GIL)."""
    if threads == 1 or pool is None:
        np.copyto(dst, src)
        return
    futures = [pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in _split(src.size, threads)]
    for f in futures:
        f.result()


def _read_files(files: Sequence[str], buf: bytearray) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(buf)


def _threaded_read(pool: ThreadPoolExecutor | None, files: list[str], bufs: list[bytearray], threads: int) -> None:
    """Sequential whole-file reads, the files split in `threads` runs of neighbours, one per thread."""
    if threads == 1 or pool is None:
        _read_files(files, bufs[0])
        return
    futures = [pool.submit(_read_files, files[a:b], bufs[i]) for i, (a, b) in enumerate(_split(len(files), threads))]
    for f in futures:
        f.result()


def _best_baseline(times: dict[int, list[float]], nbytes: int) -> dict[str, Any]:
    """GB/s of the faster thread count (medians), and each count's figure."""
    per = {threads: nbytes / median(ts) / GB for threads, ts in times.items()}
    best = max(per, key=lambda t: per[t])
    return {"gbps": per[best], "threads": best, "gbps_by_threads": {str(t): g for t, g in per.items()}}


def _keys(n: int, chunk_tokens: int, salt: str) -> list[ChunkKey]:
    root = Namespace(f"bench-{salt}", LAYOUT.layout_id(chunk_tokens)).root()
    rng = random.Random(salt)
    return chunk_keys(root, [rng.randrange(32000) for _ in range(n * chunk_tokens)], chunk_tokens)


def _layer_views(arr: np.ndarray, n: int, layers: int) -> list[list[np.ndarray]]:
    per = arr.reshape(n, layers, -1)
    return [[per[i, j] for j in range(layers)] for i in range(n)]


def _parallel_load(store: TieredStore, keys: Sequence[bytes], dests: list[list[np.ndarray]],
                   parts: int, layers: list[int] | None = None) -> None:
    step = (len(keys) + parts - 1) // parts
    handles = [store.load(keys[i:i + step], dests[i:i + step], layers) for i in range(0, len(keys), step)]
    for h in handles:
        res = h.wait()
        if res.failed:
            raise RuntimeError(f"benchmark load failed for chunks {res.failed[:5]}")


def _dram_store(n: int, verify_reads: bool, src: np.ndarray, keys: Sequence[bytes]) -> TieredStore:
    cb = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, io_threads=IO_THREADS,
                      memory=MemoryTierConfig(capacity_bytes=(n + 1) * cb, verify_reads=verify_reads))
    store = TieredStore(cfg, LAYOUT)
    store.save(keys, Namespace("bench-dram", LAYOUT.layout_id(CHUNK_TOKENS)).root(), 0,
               _layer_views(src, n, LAYOUT.num_layers)).wait()
    return store


def bench_dram(n: int, runs: int) -> dict[str, Any]:
    """DRAM tier loads (verified and not) against numpy copies with 1 and IO_THREADS threads, all
    measured in this call and interleaved run by run."""
    lb = LAYOUT.layer_bytes(CHUNK_TOKENS)
    keys = _keys(n, CHUNK_TOKENS, "dram")
    src = np.random.default_rng(0).integers(0, 256, n * LAYOUT.chunk_bytes(CHUNK_TOKENS), dtype=np.uint8)
    stores = {"kv": _dram_store(n, True, src, keys), "kv_unverified": _dram_store(n, False, src, keys)}
    dst = np.empty_like(src)
    dst_views = _layer_views(dst, n, LAYOUT.num_layers)
    # paged tensor of the vLLM CPU layout; random block ids
    num_blocks = n * 2
    paged = np.empty((num_blocks, LAYOUT.num_kv_heads, 2 * CHUNK_TOKENS, LAYOUT.head_size), dtype=np.float32)
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {"kv": [], "kv_unverified": []}
    memcpy_t: dict[int, list[float]] = {1: [], IO_THREADS: []}
    scatter_t = []
    measures = ["kv", "kv_unverified", *[f"memcpy{t}" for t in memcpy_t]]
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="bench-memcpy") as pool:
        try:
            for r in range(runs):
                for which in (measures if r % 2 == 0 else measures[::-1]):
                    dst.fill(0)
                    t0 = time.perf_counter()
                    if which in stores:
                        _parallel_load(stores[which], keys, dst_views, parts=IO_THREADS)
                        times[which].append(time.perf_counter() - t0)
                    else:
                        threads = int(which.removeprefix("memcpy"))
                        _threaded_copy(pool, dst, src, threads)
                        memcpy_t[threads].append(time.perf_counter() - t0)
                    if not np.array_equal(dst, src):
                        raise RuntimeError(f"{which} returned wrong bytes")
                # layer scatter: each layer of every chunk into random blocks of the paged tensor
                total = 0.0
                for layer in range(LAYOUT.num_layers):
                    blocks = rng.permutation(num_blocks)[:n]
                    dests = [[paged[b]] for b in blocks]
                    t0 = time.perf_counter()
                    _parallel_load(stores["kv"], keys, dests, parts=IO_THREADS, layers=[layer])
                    total += time.perf_counter() - t0
                    want = src.reshape(n, LAYOUT.num_layers, lb)[:, layer]
                    if not np.array_equal(paged[blocks].view(np.uint8).reshape(n, lb), want):
                        raise RuntimeError("layer scatter returned wrong bytes")
                scatter_t.append(total)
        finally:
            for store in stores.values():
                store.close()
    nbytes = src.nbytes
    memcpy = _best_baseline(memcpy_t, nbytes)
    read_gbps = nbytes / median(times["kv"]) / GB
    unverified_gbps = nbytes / median(times["kv_unverified"]) / GB
    scatter_gbps = nbytes / median(scatter_t) / GB
    return {"read_gbps": read_gbps, "read_gbps_unverified": unverified_gbps, "io_threads": IO_THREADS,
            "memcpy_gbps": memcpy["gbps"], "memcpy_threads": memcpy["threads"],
            "memcpy_gbps_by_threads": memcpy["gbps_by_threads"],
            "ratio": read_gbps / memcpy["gbps"], "ratio_unverified": unverified_gbps / memcpy["gbps"],
            "layer_scatter_gbps": scatter_gbps, "layer_scatter_ratio": scatter_gbps / memcpy["gbps"],
            "bytes_per_run": nbytes}


def bench_disk(n: int, runs: int, root: Path) -> dict[str, float]:
    cb = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    disk_root = root / "disk"
    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, memory=None, promote_on_hit=False, io_threads=IO_THREADS,
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
    raw_bufs = [bytearray(max(os.path.getsize(f) for f in files)) for _ in range(IO_THREADS)]
    read_t: list[float] = []
    dev_bytes: list[int] = []
    raw_t: dict[int, list[float]] = {1: [], IO_THREADS: []}
    measures = ["kv", *[f"raw{t}" for t in raw_t]]
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="bench-read") as pool:
        try:
            for r in range(runs):
                for which in (measures if r % 2 == 0 else measures[::-1]):
                    drop_page_cache(files)
                    if which == "kv":
                        dst.fill(0)
                        before = device_read_bytes()
                        t0 = time.perf_counter()
                        _parallel_load(store, keys, dst_views, parts=IO_THREADS)
                        read_t.append(time.perf_counter() - t0)
                        dev_bytes.append(device_read_bytes() - before)
                        if not np.array_equal(dst, src):
                            raise RuntimeError("disk tier read returned wrong bytes")
                    else:
                        threads = int(which.removeprefix("raw"))
                        t0 = time.perf_counter()
                        _threaded_read(pool, files, raw_bufs, threads)
                        raw_t[threads].append(time.perf_counter() - t0)
        finally:
            store.close()
    read_gbps = src.nbytes / median(read_t) / GB
    # the raw reader moves whole files (headers and padding too): count its bytes
    raw = _best_baseline(raw_t, file_bytes)
    return {"read_gbps": read_gbps, "io_threads": IO_THREADS, "raw_read_gbps": raw["gbps"],
            "raw_read_threads": raw["threads"], "raw_read_gbps_by_threads": raw["gbps_by_threads"],
            "ratio": read_gbps / raw["gbps"], "bytes_from_device": int(median(dev_bytes)),
            "payload_bytes": int(src.nbytes), "file_bytes": int(file_bytes)}


BlockHasher = Callable[[bytes | None, list[int]], bytes]  # (parent block hash or None, block tokens) -> hash


def _vllm_sha256(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def recreated_vllm_block_hash(none_hash: bytes) -> BlockHasher:
    """A re-creation of vLLM 0.32's hash_block_tokens with its default "sha256" hash function
    (sha256 of pickle((parent, tuple(tokens), extra_keys)), vLLM's NONE_HASH for the first
    parent): the baseline where vLLM is not installed."""

    def hash_block(parent: bytes | None, block_tokens: list[int]) -> bytes:
        return _vllm_sha256((parent or none_hash, tuple(block_tokens), None))

    return hash_block


def vllm_block_hasher() -> tuple[BlockHasher, str] | None:
    """vLLM's own block hash (hash_block_tokens with vLLM's default prefix-caching hash
    function, NONE_HASH initialised as vLLM does), or None when vLLM cannot be imported."""
    try:
        import vllm
        from vllm.config.cache import CacheConfig
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils
    except ImportError:
        return None
    algo = str(CacheConfig.__dataclass_fields__["prefix_caching_hash_algo"].default)
    hash_fn = get_hash_fn_by_name(algo)
    kv_cache_utils.init_none_hash(hash_fn)
    hash_block_tokens = kv_cache_utils.hash_block_tokens

    def hash_block(parent: bytes | None, block_tokens: list[int]) -> bytes:
        return hash_block_tokens(hash_fn, parent, block_tokens)  # type: ignore[arg-type]

    return hash_block, f"vLLM {vllm.__version__} hash_block_tokens ({algo})"


def block_hashes(hash_block: BlockHasher, tokens: list[int], chunk: int) -> list[bytes]:
    """Chained hashes of every full `chunk`-token block, as vLLM's request block hasher makes them."""
    out = []
    parent = None
    for i in range(0, len(tokens) - len(tokens) % chunk, chunk):
        parent = hash_block(parent, tokens[i:i + chunk])
        out.append(parent)
    return out


def bench_hash(runs: int, chunk: int = 128, tokens_per_run: int = 256 * 1024,
               baseline: tuple[BlockHasher, str] | None = None) -> dict[str, Any]:
    """Key hashing against vLLM's block hash (`baseline`; default: vLLM's own when importable,
    else the re-creation)."""
    if baseline is None:
        baseline = vllm_block_hasher() or (recreated_vllm_block_hash(hashlib.sha256(b"none").digest()),
                                           "re-creation of vLLM 0.32's hash_block_tokens (sha256; vLLM not importable)")
    hash_block, baseline_name = baseline
    rng = random.Random(3)
    root = Namespace("bench-hash", LAYOUT.layout_id(chunk)).root()
    ours: list[float] = []
    base: list[float] = []
    for r in range(runs):
        for which in (("kv", "base") if r % 2 == 0 else ("base", "kv")):
            tokens = [rng.randrange(128256) for _ in range(tokens_per_run)]  # fresh every repetition
            t0 = time.perf_counter()
            keys = chunk_keys(root, tokens, chunk) if which == "kv" else block_hashes(hash_block, tokens, chunk)
            dt = time.perf_counter() - t0
            if len(keys) != tokens_per_run // chunk:
                raise RuntimeError(f"{which} made {len(keys)} keys for {tokens_per_run // chunk} blocks")
            (ours if which == "kv" else base).append(tokens_per_run / dt)
    return {"chunk_tokens": chunk, "implementation": KEY_BACKEND, "baseline": baseline_name,
            "tokens_per_s": median(ours), "baseline_tokens_per_s": median(base), "ratio": median(ours) / median(base)}


def run_tiers_bench(json_out: str | None, root: str | None = None, gib: float = 1.0, runs: int = 5) -> dict[str, Any]:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        memory = None
    # the payload, the DRAM pool it is saved into and the buffers it is loaded back into
    if not gib > 0 or (memory is not None and 3 * gib * (1 << 30) > memory):
        raise ConfigError(f"--gib {gib}: a measurement holds about 3x that in memory, and this machine has "
                          f"{(memory or 0) / 2**30:.1f} GiB")
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
            progress.update(task, advance=1, description="disk (page cache dropped)")
            disk = bench_disk(n, runs, tmp)
            progress.update(task, advance=1, description="key hashing")
            result = {"dram": dram, "disk": disk, "hash": bench_hash(runs)}
            progress.update(task, advance=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, k, h = result["dram"], result["disk"], result["hash"]
    mem_base = f"memcpy, {d['memcpy_threads']} thr"
    print_table(f"kvtier bench tiers (kvtier: {IO_THREADS} I/O threads; baselines: the faster of 1 and {IO_THREADS} threads)",
                ["measure", "kvtier", "baseline", "ratio", "target"], [
        [f"DRAM read GB/s (vs {mem_base})", d["read_gbps"], d["memcpy_gbps"], d["ratio"], ">= 0.7"],
        [f"DRAM read GB/s, sections not re-verified (vs {mem_base})", d["read_gbps_unverified"], d["memcpy_gbps"], d["ratio_unverified"], ""],
        [f"DRAM layer scatter GB/s (vs {mem_base})", d["layer_scatter_gbps"], d["memcpy_gbps"], d["layer_scatter_ratio"], ""],
        [f"disk read GB/s, cache dropped (vs raw, {k['raw_read_threads']} thr)", k["read_gbps"], k["raw_read_gbps"], k["ratio"], ">= 0.7"],
        [f"key hashing M tokens/s, {h['implementation']} loop", h["tokens_per_s"] / 1e6, h["baseline_tokens_per_s"] / 1e6, h["ratio"], ">= 3"],
    ])
    print(f"key hashing baseline: {h['baseline']}")
    print(f"disk: {k['bytes_from_device'] / 2**20:.0f} MiB read from the device for {k['payload_bytes'] / 2**20:.0f} MiB of payload")
    write_json(json_out, result)
    return result
