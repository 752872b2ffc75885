"""`kvtier bench ttft`: time to first token with transformers, with and without kvtier.

Default (CPU): prompts of 1k, 4k, 16k tokens on a random-weight ~200M-parameter Llama in
float32 (12 layers, hidden 1024, 16 heads, 8 KV heads, vocab 32000). `--device cuda --shape
llama-8b` (or llama-1b, tiny; `--dtype bfloat16|float32`; `--lengths`, default 8192 and 32768 on
CUDA) builds the random model directly on the GPU. For each prompt length, after a warm-up
(one plain forward of another prompt of the same length, and a kvtier miss + hit of a short
prompt, so no column pays first-call costs), every column below is the median of the same number of runs (3; 5 with
--quick) of the same prompt, taken in rounds (each round runs every column once):

    no_kvtier_s       plain transformers forward over the prompt (DynamicCache, last token's logits)
    miss_s            the prompt through kvtier on an empty store (it looks up, computes, saves)
    miss_published_s  from the miss's start until the store's lookup finds every chunk it saved
    dram_hit_s        the prompt again: all but the last chunk stored in the DRAM tier
    disk_hit_s        after reopening the store (DRAM empty) and dropping the chunk files from the
                      page cache (posix_fadvise DONTNEED): stored on disk only
    load_only_s       prepare(overlap=False) of a DRAM hit: every load waited for and put in place
    suffix_compute_s  the forward after it: the uncached suffix with the prefix in place (in details)
    load_gbps         KV bytes placed in the cache / load_only_s (1e9 B/s)
    *_floor_s         CPU: bytes / raw bandwidth + suffix compute, capped at no_kvtier_s (the better
                      of loading and recomputing); raw bandwidths measured in this run: numpy memcpy
                      for DRAM, a sequential read of a page-cache-dropped file for disk.
                      CUDA: max(bytes / pinned host->GPU bandwidth, suffix compute) for DRAM and
                      max(bytes / O_DIRECT read bandwidth, suffix compute) for disk, capped likewise.
                      With --throttle-disk-gbps the disk bandwidth is the throttle's where lower.
    reduction_*       1 - hit / no_kvtier
    max_logit_diff    largest |logit - plain's| over every DRAM and disk hit
    top1_equal        every hit's top-1 token equals plain's wherever plain's top-1/top-2 gap
                      exceeds max_logit_diff
    top1_decisive     whether plain's top-1/top-2 gap exceeded max_logit_diff: only then did
                      top1_equal compare anything (hits whose logits are far off make the gap
                      small beside the tolerance, and top1_equal true without a comparison)

details[] per case: chunks_loaded / chunks_recomputed / chunks_head (disk hit: stored chunks loaded;
stored chunks recomputed with the suffix because the load planner found loading slower; stored
chunks computed by a head forward while the rest of the prefix loaded, planner.head_and_loads), the
same for the DRAM hit (dram_chunks_*), every run's time, bytes and the planner's estimates. The
floors assume loading then computing: a hit that computes a head while its tail loads can beat them.

`--throttle-disk-gbps X` caps the disk tier's reads at X 1e9 B/s (kvtier.store.throttle), so
that "never slower than recomputing" shows on any machine: the planner then recomputes what the
disk cannot deliver in time. `overlap`: an 8k prompt (512 with --quick) whose first half is stored,
loads queued per layer and waited for inside the forward (hit_s) against load then compute.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.bench.common import device_read_bytes, drop_page_cache, median, print_table, write_json
from kvtier.bench.models import LLAMA_SHAPES
from kvtier.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CUDA_LENGTHS = [8192, 32768]
PUBLISH_WAIT_S = 60.0
WARM_KVTIER_CHUNKS = 8  # the kvtier warm-up prompt: this many chunks and a token


def _sizes(quick: bool, device: str, shape: str | None) -> dict[str, Any]:
    if shape is not None and shape not in LLAMA_SHAPES:
        raise ConfigError(f"--shape {shape!r}: expected one of {', '.join(LLAMA_SHAPES)}")
    if device == "cuda" or shape is not None:
        return dict(shape=shape or "llama-8b", lengths=CUDA_LENGTHS if device == "cuda" else [128, 256, 512],
                    overlap_tokens=8192 if device == "cuda" else 512, chunk=256 if device == "cuda" else 16,
                    memcpy_mib=64, disk_mib=1024 if device == "cuda" else 16, repeats=3 if device == "cuda" else 5)
    if quick:
        return dict(model=dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512,
                               max_positions=4096), lengths=[128, 256, 512], overlap_tokens=512, chunk=16,
                    memcpy_mib=32, disk_mib=16, repeats=5)
    return dict(model=dict(num_layers=12, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=32000,
                           max_positions=32768), lengths=[1024, 4096, 16384], overlap_tokens=8192, chunk=64,
                memcpy_mib=512, disk_mib=1024, repeats=3)


def pick_torch_threads() -> tuple[int, str]:
    """All cores this process may use, or one thread when the machine is already busy: an
    oversubscribed OpenMP barrier costs tens of milliseconds per operator, which would swamp
    the short forwards of a hit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= cores:
        return 1, f"1 torch thread (load average {load:.1f} on {cores} cores: the CPUs are shared)"
    return cores, f"{cores} torch threads"


def memcpy_bandwidth(mib: int, runs: int = 5) -> float:
    """Bytes/s of a plain numpy copy between two preallocated arrays (best of `runs`)."""
    src = np.ones(mib << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best


def _write_probe_file(path: Path, mib: int) -> None:
    block = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(max(1, mib // 16)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def disk_read_bandwidth(folder: Path, mib: int) -> float:
    """Bytes/s of a sequential read (16 MiB reads) of a file just written and dropped from the page cache."""
    path = folder / "kvtier-bench-read.bin"
    _write_probe_file(path, mib)
    try:
        drop_page_cache([path])
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        total = 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        return total / (time.perf_counter() - t0)
    finally:
        path.unlink()


def odirect_read_bandwidth(folder: Path, mib: int) -> float | None:
    """Bytes/s of 16 MiB O_DIRECT reads of a fresh file (the device, no page cache); None where the
    file system refuses O_DIRECT (tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    path = folder / "kvtier-bench-odirect.bin"
    _write_probe_file(path, mib)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        path.unlink()
        return None
    try:
        buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
        total, t0 = 0, time.perf_counter()
        while n := os.preadv(fd, [buf], total):
            total += n
        return total / (time.perf_counter() - t0)
    except OSError:
        return None
    finally:
        os.close(fd)
        path.unlink()


def pool_copy_probe(store: Any, device: str, nbytes: int = 1 << 30, piece: int = 4 << 20,
                    runs: int = 3) -> dict[str, Any]:
    """Where a direct DRAM load's time goes (CUDA setup diagnostics): copies straight out of the
    store's DRAM pool (page-locked on CUDA) to `device`, as one copy, as `piece`-byte copies (a
    direct load's piece size), and as those pieces while the store's verify threads checksum the
    same bytes (as a direct load does), plus the checksums alone; GB/s, best of `runs`."""
    from kvtier.core.codec import checksum_at

    pool_np = store.pool_array()
    pool = torch.from_numpy(pool_np)
    n = min(nbytes, pool.numel()) // piece * piece
    if n == 0:
        raise ValueError(f"the pool ({pool.numel()} bytes) is smaller than one {piece}-byte piece")
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    cuda = torch.device(device).type == "cuda"
    engine = store._verify_engine()  # noqa: SLF001 - the same threads a direct load checks on
    job = 64 << 20

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return n / min(times) / 1e9

    def pieces() -> None:
        for o in range(0, n, piece):
            dst[o:o + piece].copy_(pool[o:o + piece], non_blocking=True)

    def sums() -> list[Any]:
        base = int(pool_np.ctypes.data)
        return [engine.submit("probe", lambda o=o: [checksum_at(base + i, piece)
                                                   for i in range(o, min(n, o + job), piece)])
                for o in range(0, n, job)]

    def both() -> None:
        handles = sums()
        pieces()
        for h in handles:
            h.wait()

    def sums_alone() -> None:
        for h in sums():
            h.wait()

    return {"bytes": n, "piece_bytes": piece, "pool_is_pinned": bool(pool.is_pinned()) if cuda else False,
            "one_copy_gbps": best(lambda: dst.copy_(pool[:n], non_blocking=True)),
            "pieces_gbps": best(pieces), "pieces_with_checksums_gbps": best(both),
            "checksums_alone_gbps": best(sums_alone)}


def _open_store(layout: Any, root: Path, chunk: int, dram_bytes: int, throttle_gbps: float | None,
                pool: Any = None) -> Any:
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.store.throttle import throttle_disk
    from kvtier.store.tiered import TieredStore

    cfg = StoreConfig(chunk_tokens=chunk, memory=MemoryTierConfig(capacity_bytes=dram_bytes),
                      disk=DiskTierConfig(root=str(root), capacity_bytes=64 << 30))
    store = TieredStore(cfg, layout, memory_pool=pool)
    if throttle_gbps is not None:
        throttle_disk(store, throttle_gbps)
    return store


def _device_read_bytes() -> int | None:
    try:
        return device_read_bytes()
    except (OSError, RuntimeError):
        return None


def _decisive_rows(ref: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per row of ref, whether its top-1/top-2 gap exceeds `tolerance`."""
    top = torch.topk(ref.float(), 2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > tolerance


def top1_decisive(ref: torch.Tensor, tolerance: float) -> bool:
    """Whether every row of ref is decisive, so that top1_agrees compares it."""
    return bool(_decisive_rows(ref, tolerance).all())


def top1_agrees(ref: torch.Tensor, got: torch.Tensor, tolerance: float) -> bool:
    """got's top-1 equals ref's wherever ref's top-1/top-2 gap exceeds `tolerance` (per row)."""
    same = ref.float().argmax(-1) == got.float().argmax(-1)
    return bool((same | ~_decisive_rows(ref, tolerance)).all())


def _floor(loaded: int, bandwidth: float, compute_s: float, plain_s: float, cuda: bool) -> float:
    load_s = loaded / bandwidth
    best = max(load_s, compute_s) if cuda else load_s + compute_s
    return min(best, plain_s)


class _Runner:
    """The model, the store and the timed calls of one benchmark run.

    Every store it opens (the run reopens one about 15 times, to empty DRAM) keeps its DRAM slots in
    one pool, allocated once. On CUDA the runner holds that pool's page-lock for the whole run, so a
    reopen does not unregister and register it again: a few seconds each for a 10 GiB pool, spent
    outside every timed call but inside a device lease's minutes. A running server keeps its pool
    locked too. A reopened store starts with an empty index, so nothing of the old one is found."""

    def __init__(self, model: Any, layout: Any, root: Path, chunk: int, dram_bytes: int, device: str,
                 throttle_gbps: float | None) -> None:
        from kvtier.connectors.transformers import TransformersConnector
        from kvtier.tiers.pool import aligned_pool

        self.model, self.layout, self.root, self.chunk = model, layout, root, chunk
        self.dram_bytes, self.device, self.throttle = dram_bytes, device, throttle_gbps
        self.cuda = device.startswith("cuda")
        chunk_bytes = layout.chunk_bytes(chunk)
        self.pool = aligned_pool(max(1, dram_bytes // chunk_bytes) * chunk_bytes)
        self._locked = False
        if self.cuda:
            from kvtier.connectors.copy_engine import host_registry

            self._locked = host_registry().acquire(int(self.pool.ctypes.data), self.pool.nbytes)
        self.store = _open_store(layout, root, chunk, dram_bytes, throttle_gbps, self.pool)
        self.conn = TransformersConnector(model, self.store)
        self.fingerprint = self.conn.fingerprint

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        return time.perf_counter() - t0, out

    def reopen(self, clear: bool = False) -> None:
        from kvtier.connectors.transformers import TransformersConnector
        from kvtier.tiers.disk import clear_root

        self.conn.save_copies.drain()  # saves copied off the GPU are written before the store closes
        self.store.close()
        if clear:
            clear_root(self.root)
        self.store = _open_store(self.layout, self.root, self.chunk, self.dram_bytes, self.throttle, self.pool)
        self.conn = TransformersConnector(self.model, self.store, fingerprint=self.fingerprint)

    def close(self) -> None:
        self.conn.save_copies.drain()
        self.store.close()
        if self._locked:  # the store's own page-lock announcement went with its close
            from kvtier.connectors.copy_engine import host_registry

            host_registry().release(int(self.pool.ctypes.data), self.pool.nbytes)
            self._locked = False

    def plain(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    def through(self, ids: torch.Tensor, conn: Any = None) -> tuple[Any, torch.Tensor]:
        cache, out = (conn or self.conn).prefill(ids, logits_to_keep=1)
        return cache.last_plan, out.logits[:, -1]

    def miss(self, ids: torch.Tensor) -> tuple[float, float]:
        """(miss_s, miss_published_s) on an emptied store."""
        self.reopen(clear=True)
        keys = self.conn.chunk_keys(ids[0].tolist())
        self.sync()
        t0 = time.perf_counter()
        plan, _ = self.through(ids)
        self.sync()
        miss_s = time.perf_counter() - t0
        assert plan.cached_tokens == (0,), "the miss case found chunks already stored"
        deadline = t0 + PUBLISH_WAIT_S
        while self.store.lookup(keys, touch=False).hits < len(keys):
            if time.perf_counter() > deadline:  # a save that never lands (store full): say so, do not hang
                return miss_s, float("nan")
            time.sleep(0.0005)
        return miss_s, time.perf_counter() - t0

    def load_then_compute(self, ids: torch.Tensor) -> tuple[float, float, Any]:
        from kvtier.connectors.transformers import TransformersConnector

        nosave = TransformersConnector(self.model, self.store, fingerprint=self.fingerprint, save=False)
        cache = nosave.new_cache()
        load_s, plan = self.timed(cache.prepare, ids, overlap=False)
        with torch.no_grad():
            comp_s, _ = self.timed(self.model, **plan.model_inputs(), **nosave.cache_kwargs(cache), logits_to_keep=1)
        return load_s, comp_s, plan

    def disk_hit(self, ids: torch.Tensor) -> tuple[float, Any, torch.Tensor, int, int | None]:
        """(seconds, plan, logits, chunks the disk tier served, bytes read from a block device by
        this process meanwhile: near 0 when the folder is on tmpfs, or when dropping the page cache
        did nothing, and the "disk" hit read RAM; None where /proc/self/io is missing)."""
        from kvtier.core import metrics as m

        self.reopen()
        assert self.store.disk is not None
        drop_page_cache([self.store.disk.path_of(k) for k in self.conn.chunk_keys(ids[0].tolist())])
        before = _device_read_bytes()
        s, (plan, got) = self.timed(self.through, ids)
        after = _device_read_bytes()
        dev = after - before if before is not None and after is not None else None
        return s, plan, got, int(self.store.metrics.get(m.HITS, tier="disk")), dev


def run_ttft_bench(json_out: str | os.PathLike[str] | None, png_out: str | os.PathLike[str] | None = None,
                   quick: bool = False, root: str | os.PathLike[str] | None = None, device: str = "cpu",
                   shape: str | None = None, dtype: str | None = None, lengths: list[int] | None = None,
                   throttle_disk_gbps: float | None = None, repeats: int | None = None) -> dict[str, Any]:
    from kvtier.bench.models import random_llama, random_llama_shaped
    from kvtier.connectors.transformers import model_layout
    from kvtier.store.planner import ESTIMATES

    cuda = device.startswith("cuda")
    if not cuda and device != "cpu":
        raise ConfigError(f"--device {device!r}: expected cpu or cuda (cuda:N)")
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if throttle_disk_gbps is not None and not throttle_disk_gbps > 0:
        raise ConfigError(f"--throttle-disk-gbps must be positive, got {throttle_disk_gbps}")
    size = _sizes(quick, "cuda" if cuda else "cpu", shape)
    if lengths:
        if any(n < 2 for n in lengths):
            raise ConfigError(f"--lengths: every prompt needs at least 2 tokens, got {lengths}")
        size["lengths"] = list(lengths)
    runs = size["repeats"] if repeats is None else repeats
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"--repeats {repeats!r}: expected a whole number >= 1")
    torch_dtype = DTYPES[dtype or ("bfloat16" if cuda else "float32")]
    threads, why = pick_torch_threads()
    torch.set_num_threads(threads)
    if "shape" in size:
        longest = max(size["lengths"] + [size["overlap_tokens"]])
        model = random_llama_shaped(size["shape"], device, torch_dtype, max_positions=max(longest + 1, 4096))
        described = size["shape"]
    else:
        model = random_llama(**size["model"])
        torch.nn.Module.to(model, device=device, dtype=torch_dtype)  # transformers types .to() narrowly
        described = "default"
    params = sum(p.numel() for p in model.parameters())
    layout = model_layout(model)
    chunk = size["chunk"]
    token_bytes = layout.num_layers * layout.token_bytes_per_layer()
    total_tokens = max(size["lengths"] + [size["overlap_tokens"]])
    dram_bytes = int(total_tokens * token_bytes * 2.5) + (64 << 20)
    print(f"model: random-weight Llama ({described}), {params / 1e6:.0f}M parameters, {layout.num_layers} layers, "
          f"{layout.num_kv_heads} KV heads x {layout.head_size}, {layout.dtype} on {device}; {why}; "
          f"{chunk}-token chunks; KV {token_bytes} bytes/token; median of {runs} warm runs per column")

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-ttft-")
        root = tmp.name
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    setup: dict[str, Any] = {"device": device, "shape": described, "dtype": layout.dtype, "parameters": params,
                             "layout": {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads,
                                        "head_size": layout.head_size, "dtype": layout.dtype},
                             "chunk_tokens": chunk, "torch_threads": threads, "quick": quick, "repeats": runs,
                             "throttle_disk_gbps": throttle_disk_gbps}
    mem_bw = memcpy_bandwidth(size["memcpy_mib"])
    disk_bw = disk_read_bandwidth(root, size["disk_mib"])
    setup.update(memcpy_bytes_per_s=mem_bw, disk_read_bytes_per_s=disk_bw)
    if cuda:
        from kvtier.connectors.copy_engine import host_to_device_probe

        probe = host_to_device_probe(device, 1 << 30)  # best of 3 pinned copies of 1 GiB
        assert probe is not None  # CUDA
        setup["h2d_pinned_gbps"] = probe[0] / probe[1] / 1e9
        odirect = odirect_read_bandwidth(root, size["disk_mib"])
        setup["odirect_read_gbps"] = odirect / 1e9 if odirect else None
        dram_floor_bw = setup["h2d_pinned_gbps"] * 1e9
        disk_floor_bw = odirect or disk_bw
    else:
        dram_floor_bw, disk_floor_bw = mem_bw, disk_bw
    if throttle_disk_gbps is not None:
        disk_floor_bw = min(disk_floor_bw, throttle_disk_gbps * 1e9)
    print(f"raw bandwidth: memcpy {mem_bw / 1e9:.2f} GB/s, cache-dropped sequential read {disk_bw / 1e9:.2f} GB/s"
          + (f", pinned host->GPU {setup['h2d_pinned_gbps']:.1f} GB/s, O_DIRECT read "
             f"{(setup['odirect_read_gbps'] or 0):.2f} GB/s" if cuda else "")
          + (f"; disk reads throttled to {throttle_disk_gbps} GB/s" if throttle_disk_gbps else ""))

    bench = _Runner(model, layout, root / "store", chunk, dram_bytes, device, throttle_disk_gbps)
    setup["direct_loads"] = bench.conn.direct_loads  # DRAM hits copied straight out of the page-locked pool
    setup["direct_saves"] = bench.conn.direct_saves  # misses copied straight into the reserved pool slots
    if cuda:  # where a direct load's time goes: the pool's copy speed, alone and beside its checksums
        setup["pool_copy"] = pool_copy_probe(bench.store, device)
        print("pool -> GPU: " + ", ".join(f"{k} {v:.1f}" for k, v in setup["pool_copy"].items() if k.endswith("gbps")))
    vocab = model.config.vocab_size
    cases: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []

    def prompt(n: int, seed: int) -> torch.Tensor:
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)

    try:
        for i, n in enumerate(size["lengths"]):
            ids = prompt(n, 100 + i)
            # first-call costs are paid here, by no column: a plain forward of this length, and a kvtier
            # miss and hit of a shorter prompt (the code paths; a full-length one would double the run)
            bench.timed(bench.plain, prompt(n, 500 + i))
            warm = prompt(min(n, WARM_KVTIER_CHUNKS * chunk + 1), 700 + i)
            bench.miss(warm)
            bench.timed(bench.through, warm)

            # One round per repeat, every column in turn, so a change in what else the machine is
            # doing shifts every column alike.
            ref = None
            base_runs, miss_runs, published_runs, dram_runs, load_runs, comp_runs = [], [], [], [], [], []
            disk_runs, disk_reads, disk_loaded, diffs, top1 = [], [], [], [], []
            disk_dev: list[int | None] = []
            dram_plan = disk_plan = load_plan = None
            for _ in range(runs):
                s, logits = bench.timed(bench.plain, ids)
                base_runs.append(s)
                ref = logits if ref is None else ref
                s, p = bench.miss(ids)
                miss_runs.append(s)
                published_runs.append(p)
                s, (dram_plan, got) = bench.timed(bench.through, ids)
                dram_runs.append(s)
                assert ref is not None
                diffs.append((got.float() - ref.float()).abs().max().item())
                top1.append(got)
                load_s, comp_s, load_plan = bench.load_then_compute(ids)
                load_runs.append(load_s)
                comp_runs.append(comp_s)
                s, disk_plan, got, reads, dev = bench.disk_hit(ids)
                disk_dev.append(dev)
                disk_runs.append(s)
                disk_reads.append(reads)
                disk_loaded.append(disk_plan.cached_tokens[0] // chunk)
                diffs.append((got.float() - ref.float()).abs().max().item())
                top1.append(got)
            assert dram_plan is not None and disk_plan is not None and load_plan is not None and ref is not None

            base_s, comp_s, load_s = median(base_runs), median(comp_runs), median(load_runs)
            dram_s, disk_s = median(dram_runs), median(disk_runs)
            placed = load_plan.cached_tokens[0] * token_bytes
            stored = (n - 1) // chunk * chunk * token_bytes  # what a hit could load
            max_diff = max(diffs)
            case = {"prompt_tokens": n, "no_kvtier_s": base_s, "miss_s": median(miss_runs),
                    "miss_published_s": median(published_runs), "dram_hit_s": dram_s, "disk_hit_s": disk_s,
                    "dram_floor_s": _floor(stored, dram_floor_bw, comp_s, base_s, cuda),
                    "disk_floor_s": _floor(stored, disk_floor_bw, comp_s, base_s, cuda),
                    "reduction_dram": 1 - dram_s / base_s, "reduction_disk": 1 - disk_s / base_s,
                    "load_only_s": load_s, "load_gbps": placed / load_s / 1e9 if load_s else 0.0,
                    "max_logit_diff": max_diff, "top1_equal": all(top1_agrees(ref, g, max_diff) for g in top1),
                    "top1_decisive": top1_decisive(ref, max_diff)}
            cases.append(case)
            details.append({"prompt_tokens": n, "stored_tokens": stored // token_bytes, "bytes_stored": stored,
                            "chunks_loaded": disk_plan.cached_tokens[0] // chunk,
                            "chunks_recomputed": disk_plan.skipped_tokens[0] // chunk,
                            "chunks_head": disk_plan.head_tokens[0] // chunk,
                            "dram_chunks_loaded": dram_plan.cached_tokens[0] // chunk,
                            "dram_chunks_recomputed": dram_plan.skipped_tokens[0] // chunk,
                            "dram_chunks_head": dram_plan.head_tokens[0] // chunk,
                            "disk_chunks_read": disk_reads, "disk_chunks_loaded_runs": disk_loaded,
                            "disk_device_read_bytes": disk_dev,
                            "suffix_compute_s": comp_s,
                            "no_kvtier_runs_s": base_runs, "miss_runs_s": miss_runs,
                            "miss_published_runs_s": published_runs, "dram_hit_runs_s": dram_runs,
                            "disk_hit_runs_s": disk_runs, "load_only_runs_s": load_runs,
                            "suffix_compute_runs_s": comp_runs, "max_logit_diffs": diffs})
            print(f"{n:>6} tokens: no_kvtier {base_s:.4f} s, miss {case['miss_s']:.4f} s, DRAM hit {dram_s:.4f} s "
                  f"(floor {case['dram_floor_s']:.4f}), disk hit {disk_s:.4f} s (floor {case['disk_floor_s']:.4f}; "
                  f"{details[-1]['chunks_loaded']} chunks loaded, {details[-1]['chunks_recomputed']} recomputed, "
                  f"{details[-1]['chunks_head']} in a head); "
                  f"load only {load_s:.4f} s ({case['load_gbps']:.2f} GB/s); max |dlogit| {max_diff:.1e}")
            loaded_bytes = details[-1]["chunks_loaded"] * chunk * token_bytes
            if loaded_bytes and all(d is not None and d < loaded_bytes // 10 for d in disk_dev):
                print(f"  warning: the disk hits read {max(d or 0 for d in disk_dev)} bytes from a block device for "
                      f"{loaded_bytes} loaded: the disk tier's folder is on tmpfs, or dropping its page cache did "
                      "nothing; those hits read RAM (pass --root on a real disk)")
            # a run cut short (a device lease's time cap) keeps the lengths it finished
            write_json(json_out, {"cases": cases, "setup": setup, "details": details,
                                  "partial": "the lengths finished so far; overlap not run yet"})

        overlap, overlap_diff = _overlap(bench, prompt, size["overlap_tokens"], runs)
    finally:
        bench.close()
        if tmp is not None:
            tmp.cleanup()

    setup["estimates"] = ESTIMATES.snapshot()
    result = {"cases": cases, "overlap": overlap, "setup": setup, "details": details,
              "overlap_max_logit_diff": overlap_diff}
    print_table("TTFT (s), medians", ["prompt", "no kvtier", "miss", "DRAM hit", "DRAM floor", "disk hit",
                                      "disk floor", "reduction DRAM", "reduction disk", "disk chunks loaded"],
                [[c["prompt_tokens"], c["no_kvtier_s"], c["miss_s"], c["dram_hit_s"], c["dram_floor_s"],
                  c["disk_hit_s"], c["disk_floor_s"], f"{c['reduction_dram']:.1%}", f"{c['reduction_disk']:.1%}",
                  d["chunks_loaded"]] for c, d in zip(cases, details)])
    write_json(json_out, result)
    if png_out:
        _plot(cases, png_out)
    return result


def _overlap(bench: _Runner, prompt: Callable[[int, int], torch.Tensor], n: int,
             runs: int) -> tuple[dict[str, Any], float]:
    """A prompt whose first half is stored: load then compute, against loads overlapped with the forward."""
    from kvtier.connectors.transformers import TransformersConnector

    ids = prompt(n, 999)
    bench.reopen(clear=True)
    bench.through(ids[:, : n // 2])
    bench.store.flush()
    ref = bench.plain(ids)
    nosave = TransformersConnector(bench.model, bench.store, fingerprint=bench.fingerprint, save=False)
    loads, comps, hits = [], [], []
    got = ref
    plan = None
    for _ in range(runs):
        load_s, comp_s, _ = bench.load_then_compute(ids)
        hit_s, (plan, got) = bench.timed(bench.through, ids, nosave)
        loads.append(load_s)
        comps.append(comp_s)
        hits.append(hit_s)
    assert plan is not None
    overlap = {"prompt_tokens": n, "hit_fraction": plan.cached_tokens[0] / n, "hit_s": median(hits),
               "load_only_s": median(loads), "compute_only_s": median(comps)}
    diff = (got.float() - ref.float()).abs().max().item()
    print(f"overlap at {n} tokens ({overlap['hit_fraction']:.0%} stored): hit {overlap['hit_s']:.4f} s, load only "
          f"{overlap['load_only_s']:.4f} s, compute only {overlap['compute_only_s']:.4f} s; max |dlogit| {diff:.1e}")
    return overlap, diff


def _plot(cases: list[dict[str, Any]], png_out: str | os.PathLike[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [c["prompt_tokens"] for c in cases]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in [("no_kvtier_s", "no kvtier", "o-"), ("miss_s", "kvtier miss (saving)", "s--"),
                              ("dram_hit_s", "DRAM hit", "^-"), ("disk_hit_s", "disk hit (page cache dropped)", "v-"),
                              ("dram_floor_s", "DRAM floor", ":"), ("disk_floor_s", "disk floor", "-.")]:
        ax.plot(x, [c[key] for c in cases], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s), median of warm runs")
    ax.set_title("TTFT with transformers: kvtier prefix reuse")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(png_out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_out, dpi=120)
    plt.close(fig)
    print(f"wrote {png_out}")
