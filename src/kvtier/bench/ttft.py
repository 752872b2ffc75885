"""`kvtier bench ttft`: time to first token with transformers, with and without kvtier.

For each prompt length (1k, 4k, 16k tokens; a random-weight ~200M-parameter Llama in float32:
12 layers, hidden 1024, 16 heads, 8 KV heads, vocab 32000) and in one run:

    no_kvtier_s   plain transformers forward over the prompt (DynamicCache, logits of the last token)
    miss_s        the same cold prompt through kvtier, which looks it up and saves its chunks
    dram_hit_s    the same prompt again: all but the last chunk served from the DRAM tier (median of 3)
    disk_hit_s    after reopening the store (DRAM empty) and dropping the chunk files from the page
                  cache: served from the disk tier
    *_floor_s     bytes loaded / raw bandwidth + compute_s, where the bandwidths are measured in this
                  run (numpy memcpy for DRAM; a sequential read of a page-cache-dropped file for disk)
                  and compute_s is the forward over the uncached suffix with the prefix already in
                  place (prepare(overlap=False), then the timed forward)
    reduction_*   1 - hit / no_kvtier

and `overlap`: an 8k prompt whose first half is stored: load_only_s (prepare with every load
waited for and put in place), compute_only_s (the forward after it), hit_s (prepare with per-layer
loads queued, then the forward that waits on each layer). Saving is off in the overlap runs so
every run sees the same 50% hit. Logits of every hit are checked against no_kvtier (max abs diff
in `details`). Timings are single runs unless noted, on whatever else the machine is doing.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.bench.common import drop_page_cache, median, print_table, write_json


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(model=dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512,
                               max_positions=4096), lengths=[128, 256, 512], overlap_tokens=512, chunk=16,
                    memcpy_mib=32, disk_mib=16, dram_repeats=1)
    return dict(model=dict(num_layers=12, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=32000,
                           max_positions=32768), lengths=[1024, 4096, 16384], overlap_tokens=8192, chunk=64,
                memcpy_mib=512, disk_mib=1024, dram_repeats=3)


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


def disk_read_bandwidth(folder: Path, mib: int) -> float:
    """Bytes/s of a sequential read (16 MiB reads) of a file just written and dropped from the page cache."""
    path = folder / "kvtier-bench-read.bin"
    block = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(max(1, mib // 16)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
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


def _open_store(layout: Any, root: Path, chunk: int, dram_bytes: int) -> Any:
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore

    cfg = StoreConfig(chunk_tokens=chunk, memory=MemoryTierConfig(capacity_bytes=dram_bytes),
                      disk=DiskTierConfig(root=str(root), capacity_bytes=64 << 30))
    return TieredStore(cfg, layout)


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_ttft_bench(json_out: str | os.PathLike[str] | None, png_out: str | os.PathLike[str] | None = None,
                   quick: bool = False, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    from kvtier.bench.models import random_llama
    from kvtier.connectors.transformers import TransformersConnector, model_layout

    size = _sizes(quick)
    threads, why = pick_torch_threads()
    torch.set_num_threads(threads)
    model = random_llama(**size["model"])
    params = sum(p.numel() for p in model.parameters())
    layout = model_layout(model)
    chunk = size["chunk"]
    token_bytes = layout.num_layers * layout.token_bytes_per_layer()
    total_tokens = sum(size["lengths"]) + size["overlap_tokens"]
    dram_bytes = int(total_tokens * token_bytes * 1.25) + (64 << 20)
    print(f"model: random-weight Llama, {params / 1e6:.0f}M parameters, {layout.num_layers} layers, "
          f"{layout.num_kv_heads} KV heads x {layout.head_size}, float32; {why}; "
          f"{chunk}-token chunks; KV {token_bytes} bytes/token")

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-ttft-")
        root = tmp.name
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mem_bw = memcpy_bandwidth(size["memcpy_mib"])
    disk_bw = disk_read_bandwidth(root, size["disk_mib"])
    print(f"raw bandwidth: memcpy {mem_bw / 1e9:.2f} GB/s, cache-dropped sequential read {disk_bw / 1e9:.2f} GB/s")

    store = _open_store(layout, root / "store", chunk, dram_bytes)
    conn = TransformersConnector(model, store)
    fingerprint = conn.fingerprint
    vocab = model.config.vocab_size
    cases: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []

    def plain(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1).logits[:, -1]

    def through(c: TransformersConnector, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        cache, out = c.prefill(ids, logits_to_keep=1)
        return cache.last_plan, out.logits[:, -1]

    def compute_only(c: TransformersConnector, ids: torch.Tensor) -> tuple[float, float, Any]:
        cache = c.new_cache()
        load_s, plan = _timed(cache.prepare, ids, overlap=False)
        with torch.no_grad():
            comp_s, _ = _timed(model, **plan.model_inputs(), **c.cache_kwargs(cache), logits_to_keep=1)
        return load_s, comp_s, plan

    try:
        for i, n in enumerate(size["lengths"]):
            ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(100 + i))
            base_s, ref = _timed(plain, ids)
            miss_s, (plan, _) = _timed(through, conn, ids)
            assert plan.cached_tokens == (0,), "the miss case found chunks already stored"
            store.flush()
            runs = []
            for _ in range(size["dram_repeats"]):
                s, (plan, got) = _timed(through, conn, ids)
                runs.append(s)
            dram_s = median(runs)
            dram_diff = (got - ref).abs().max().item()
            cached = plan.cached_tokens[0]
            nosave = TransformersConnector(model, store, fingerprint=fingerprint, save=False)
            _, comp_s, _ = compute_only(nosave, ids)
            store.close()
            store = _open_store(layout, root / "store", chunk, dram_bytes)
            conn = TransformersConnector(model, store, fingerprint=fingerprint)
            drop_page_cache([store.disk.path_of(k) for k in conn.chunk_keys(ids[0].tolist())])
            disk_s, (plan, got) = _timed(through, conn, ids)
            disk_diff = (got - ref).abs().max().item()
            from_disk = int(store.metrics.get("kvtier_tier_hits_total", tier="disk"))
            loaded = cached * token_bytes
            case = {"prompt_tokens": n, "no_kvtier_s": base_s, "miss_s": miss_s, "dram_hit_s": dram_s,
                    "disk_hit_s": disk_s, "dram_floor_s": loaded / mem_bw + comp_s,
                    "disk_floor_s": loaded / disk_bw + comp_s, "reduction_dram": 1 - dram_s / base_s,
                    "reduction_disk": 1 - disk_s / base_s}
            cases.append(case)
            details.append({"prompt_tokens": n, "cached_tokens": cached, "bytes_loaded": loaded,
                            "suffix_compute_s": comp_s, "dram_hit_runs_s": runs, "disk_chunks_read": from_disk,
                            "max_logit_diff_dram": dram_diff, "max_logit_diff_disk": disk_diff})
            print(f"{n:>6} tokens: no_kvtier {base_s:.3f} s, miss {miss_s:.3f} s, DRAM hit {dram_s:.3f} s "
                  f"(floor {case['dram_floor_s']:.3f}), disk hit {disk_s:.3f} s (floor {case['disk_floor_s']:.3f}); "
                  f"max |dlogit| {max(dram_diff, disk_diff):.1e}")

        n = size["overlap_tokens"]
        ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(999))
        conn.prefill(ids[:, : n // 2], logits_to_keep=1)
        store.flush()
        ref = plain(ids)
        nosave = TransformersConnector(model, store, fingerprint=fingerprint, save=False)
        load_s, comp_s, plan = compute_only(nosave, ids)
        hit_s, (plan, got) = _timed(through, nosave, ids)
        overlap = {"prompt_tokens": n, "hit_fraction": plan.cached_tokens[0] / n, "hit_s": hit_s,
                   "load_only_s": load_s, "compute_only_s": comp_s}
        overlap_diff = (got - ref).abs().max().item()
        print(f"overlap at {n} tokens ({overlap['hit_fraction']:.0%} stored): hit {hit_s:.3f} s, load only "
              f"{load_s:.3f} s, compute only {comp_s:.3f} s; max |dlogit| {overlap_diff:.1e}")
    finally:
        store.close()
        if tmp is not None:
            tmp.cleanup()

    result = {"cases": cases, "overlap": overlap,
              "setup": {"parameters": params, "layout": {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads,
                                                         "head_size": layout.head_size, "dtype": layout.dtype},
                        "chunk_tokens": chunk, "torch_threads": threads, "quick": quick,
                        "memcpy_bytes_per_s": mem_bw, "disk_read_bytes_per_s": disk_bw},
              "details": details, "overlap_max_logit_diff": overlap_diff}
    print_table("TTFT (s)", ["prompt", "no kvtier", "miss", "DRAM hit", "DRAM floor", "disk hit", "disk floor",
                             "reduction DRAM", "reduction disk"],
                [[c["prompt_tokens"], c["no_kvtier_s"], c["miss_s"], c["dram_hit_s"], c["dram_floor_s"],
                  c["disk_hit_s"], c["disk_floor_s"], f"{c['reduction_dram']:.1%}", f"{c['reduction_disk']:.1%}"]
                 for c in cases])
    write_json(json_out, result)
    if png_out:
        _plot(cases, png_out)
    return result


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
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT with transformers: kvtier prefix reuse")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(png_out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_out, dpi=120)
    plt.close(fig)
    print(f"wrote {png_out}")
