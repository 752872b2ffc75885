"""Host time of sparse decode's per-step work at one layer of a real model's shape, on the CPU.

Issue 22's H200 run (llama-8b, bf16, 128k context, budget 1/16, drift 0.98) spent 232 ms of a
440 ms decode step in the working sets' fill (`SparseKV._fill`): ~7 ms per layer for a few MB of
slices, i.e. host overhead, which this machine can measure. This script rebuilds that fill with
few layers (the store holds every layer's full KV; 2 layers of a 128k context are 1 GiB):

    8 KV heads x head_size 128, 32 query heads, bf16, 64-token blocks (the bench's llama-8b plan),
    budget 1/16 of the context, sinks 64 / window 128 tokens, prefetch 4 blocks (the CUDA default),
    decode fills staged as on an accelerator (SparseKV(stage_fetches=True)), random KV,
    queries that drift: q_t = drift * q_{t-1} + sqrt(1 - drift^2) * fresh, renormalized.

and reports per layer and decode step the medians (over steps, then the median over `--runs`) of:
selection (`_select`), plan (`WorkingSet.ensure` without its fill), gather+verify (the store
read of the slices, checksums included), staging copy (host rows -> device), write_slots (into the
slots), prefetch (start + take on this thread), fill (all of `_fill`), attend (all of it, append
excluded) and append. The parts are timed by wrapping methods of this one SparseKV (this thread only:
the prefetcher's own reads run on its worker). `--cprofile FILE` writes a cProfile of the timed steps.

    PYTHONPATH=src flock /tmp/kvtier-bench.lock python scripts/profile_sparse_fill.py --json out.json
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import math
import pstats
import statistics
import threading
import time
from collections import defaultdict
from typing import Any

import torch

from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.sparse import SparseConfig, SparseKV, sparse_store_layout
from kvtier.sparse.staging import HostStaging
from kvtier.sparse.working_set import WorkingSet
from kvtier.store.tiered import TieredStore

PARTS = ("selection", "plan", "gather_verify", "staging_copy", "write_slots", "prefetch", "fill", "attend", "append")


class Timers:
    """Seconds per named part, this thread only (re-entrant calls of one part are counted once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._main = threading.get_ident()
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, obj: Any, attr: str, part: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._main or self._depth[part]:
                return fn(*args, **kwargs)
            self._depth[part] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - t0
                self._depth[part] -= 1

        setattr(obj, attr, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def instrument(kv: SparseKV, timers: Timers) -> None:
    """Wrap the parts of one SparseKV's decode step (whichever of them this version of the code has)."""
    timers.wrap(kv, "_select", "selection")
    timers.wrap(kv, "_fill", "fill")
    timers.wrap(kv, "attend", "attend")
    timers.wrap(kv, "append", "append")
    for name in ("_store_gather", "_gather_direct"):
        if hasattr(kv, name):
            timers.wrap(kv, name, "gather_verify")
    staging = getattr(kv, "_fill_staging", None)
    if isinstance(staging, HostStaging):
        timers.wrap(staging, "to_device", "staging_copy")
    for ws in kv.working:
        assert isinstance(ws, WorkingSet)
        timers.wrap(ws, "ensure", "ensure")
        timers.wrap(ws, "write_slots", "write_slots")
    if kv._prefetch is not None:
        timers.wrap(kv._prefetch, "start", "prefetch")
        timers.wrap(kv._prefetch, "take", "prefetch")


def build(args: argparse.Namespace) -> tuple[TieredStore, SparseKV, KVLayout]:
    layout = KVLayout(args.layers, args.kv_heads, args.head_size, "bfloat16")
    per_layer = layout.token_bytes_per_layer() * (args.context + 4096)
    store = TieredStore(StoreConfig(chunk_tokens=args.block, memory=MemoryTierConfig(
        capacity_bytes=int(per_layer * args.layers * 1.1) + (64 << 20), verify_reads=True)), sparse_store_layout(layout))
    budget = max(int(args.context * args.budget_fraction) // args.block * args.block, 4 * args.block)
    cfg = SparseConfig(policy="quest", budget_tokens=budget, block_tokens=args.block, sink_tokens=args.block,
                       window_tokens=2 * args.block, prefetch_blocks=args.prefetch,
                       dense_stream_tokens=args.block)  # prefill keeps nothing gathered: decode is what is timed
    kv = SparseKV(store, cfg, layout, stage_fetches=not args.direct_host, device=args.device)
    return store, kv, layout


def write_context(kv: SparseKV, args: argparse.Namespace, gen: torch.Generator) -> float:
    t0 = time.perf_counter()
    span = 8192
    for lo in range(0, args.context, span):
        n = min(span, args.context - lo)
        for layer in range(args.layers):
            kv.append(layer, torch.randn(args.kv_heads, n, args.head_size, generator=gen).to(args.device, torch.bfloat16),
                      torch.randn(args.kv_heads, n, args.head_size, generator=gen).to(args.device, torch.bfloat16))
    kv.flush()
    kv.release_prefill()
    return time.perf_counter() - t0


def decode(kv: SparseKV, args: argparse.Namespace, gen: torch.Generator, timers: Timers,
           profile: cProfile.Profile | None) -> tuple[list[dict[str, float]], float]:
    """Per-step part seconds (summed over layers) of args.steps steps after one warm-up; churn."""
    hq = args.kv_heads * args.q_per_kv
    scale = args.head_size**-0.5
    q_prev = torch.randn(args.layers, hq, 1, args.head_size, generator=gen)
    dev = torch.device(args.device)
    keep, fresh = args.drift, math.sqrt(1 - args.drift**2)
    steps: list[dict[str, float]] = []
    picks = kv.config.retrieval_slots * args.kv_heads * args.layers
    slices_before = 0
    for step in range(args.steps + 1):
        q_new = torch.randn(args.layers, hq, 1, args.head_size, generator=gen)
        q = keep * q_prev + fresh * q_new
        q = q / q.norm(dim=-1, keepdim=True) * q_new.norm(dim=-1, keepdim=True)
        q_prev = q
        k = torch.randn(args.layers, args.kv_heads, 1, args.head_size, generator=gen).to(torch.bfloat16)
        v = torch.randn(args.layers, args.kv_heads, 1, args.head_size, generator=gen).to(torch.bfloat16)
        qb, k, v = q.to(dev, torch.bfloat16), k.to(dev), v.to(dev)
        timers.take()
        if step == 1:
            slices_before = sum(ws.fetched_slices for ws in kv.working)
        if profile is not None and step >= 1:
            profile.enable()
        t0 = time.perf_counter()
        for layer in range(args.layers):
            kv.append(layer, k[layer], v[layer])
            kv.attend(layer, qb[layer], scale)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        total = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        parts = timers.take()
        parts["step"] = total
        if step >= 1:  # the first step fills the whole working set
            steps.append(parts)
    slices = sum(ws.fetched_slices for ws in kv.working) - slices_before
    return steps, slices / (picks * args.steps)


def memory_floor(store: TieredStore, n: int, repeats: int, gen: torch.Generator) -> float:
    """Seconds of the bytes alone for n (block, head) slices: one index_select of n random K+V rows
    out of the DRAM pool and a checksum of each section (median of `repeats`): what a fill of n
    slices cannot go below on this machine, the rest of `gather_verify` being overhead."""
    from kvtier.core.codec import checksum

    pool = store.pool_rows()
    lb = store.layer_bytes
    out = torch.empty(n * 2, lb, dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        first = torch.randint(0, pool.shape[0] // 2, (n,), generator=gen) * 2
        idx = torch.stack((first, first + 1), 1).reshape(-1)
        t0 = time.perf_counter()
        torch.index_select(pool, 0, idx, out=out)
        for row in out.numpy():
            checksum(row)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_layer_medians(steps: list[dict[str, float]], layers: int) -> dict[str, float]:
    keys = sorted({k for s in steps for k in s})
    out = {k: 1e3 * statistics.median(s.get(k, 0.0) for s in steps) / layers for k in keys}
    if "ensure" in out:
        out["plan"] = out["ensure"] - out.get("fill", 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-per-kv", type=int, default=4)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--budget-fraction", type=float, default=1 / 16)
    p.add_argument("--drift", type=float, default=0.98)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=3, help="decode runs over the same context (medians of their medians)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (host times of the real staged path; a GPU's "
                   "parts are launch times, the waits land where the host blocks: the plan's copy, the step's end)")
    p.add_argument("--direct-host", action="store_true", help="CPU decode's fill (no staging), for contrast")
    p.add_argument("--cprofile", help="write a cProfile of the timed steps here (and print its top)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    store, kv, layout = build(args)
    try:
        write_s = write_context(kv, args, gen)
        timers = Timers()
        instrument(kv, timers)
        profile = cProfile.Profile() if args.cprofile else None
        runs, churns = [], []
        for _ in range(args.runs):
            steps, churn = decode(kv, args, gen, timers, profile)
            runs.append(per_layer_medians(steps, args.layers))
            churns.append(churn)
        slices = statistics.median(churns) * kv.config.retrieval_slots * args.kv_heads
        floor_ms = 1e3 * memory_floor(store, max(1, round(slices)), 9, gen)
        kv.close()
    finally:
        store.close()
    keys = sorted({k for r in runs for k in r})
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    result = {"args": vars(args), "budget_tokens": kv.config.budget_tokens, "write_s": round(write_s, 1),
              "gather_verify_floor_ms": floor_ms,
              "retrieval_churn": statistics.median(churns), "new_slices_per_layer_step": slices,
              "ms_per_layer_step": med, "runs": runs}
    print(f"context {args.context}, budget {kv.config.budget_tokens} tokens, drift {args.drift}, churn "
          f"{result['retrieval_churn']:.3f} (~{slices:.0f} new slices a layer and step), prefetch {args.prefetch}")
    print("ms per layer and step (median of run medians): " + ", ".join(
        f"{k} {med[k]:.3f}" for k in (*PARTS, "step") if k in med))
    print(f"the bytes alone (index_select of {slices:.0f} random slices out of the pool + their checksums): "
          f"{floor_ms:.3f} ms")
    if profile is not None:
        profile.dump_stats(args.cprofile)
        pstats.Stats(args.cprofile).sort_stats("tottime").print_stats(25)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
