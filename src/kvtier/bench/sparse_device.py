"""`kvtier bench sparse --device cpu|cuda --shape tiny|llama-1b|llama-8b`: sparse decode where the model runs.

    device_rows(device, shape, dtype, quick) -> dict     the `setup`, `gpu_decode`, `prefill`,
                                                        `max_context` and `batched` keys of the JSON

A random-weight Llama of a named shape (shared with `bench ttft`) is built on the device and
decodes through the transformers connector (attn_implementation="kvtier_sparse" with a
KVTierSparseCache over a DRAM TieredStore) against the same model with sdpa over a preallocated
StaticCache in the decode rows (a DynamicCache copies its whole KV at every step) and a
DynamicCache in the prefill rows. Every row is measured, never filled in: the CUDA-only rows (`max_context` and
`batched` need a memory cap, `torch.cuda.set_per_process_memory_fraction`, and GPU KV bytes come
from `torch.cuda.max_memory_allocated`) report `null` values and a `skipped` reason elsewhere.

Decode inputs: each step feeds the greedy token's embedding mixed with the previous input,
drift * previous + sqrt(1 - drift^2) * new (rescaled to the new one's norm), so consecutive
queries are as correlated as `drift` says (0 = plain greedy decoding); `retrieval_churn` is the
share of the retrieved (block, KV head) picks fetched anew per step.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvtier.bench.models import LLAMA_SHAPES, random_llama_shaped
from kvtier.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def llama_shapes() -> dict[str, dict[str, int]]:
    """The shapes --shape names: the same table as `bench ttft --shape`."""
    return LLAMA_SHAPES


def build_model(shape: str, device: torch.device, dtype: torch.dtype, max_positions: int):
    """A random-weight Llama of `shape` built directly on `device` in `dtype`."""
    return random_llama_shaped(shape, device, dtype, max_positions=max_positions)


def parse_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device on this machine")
    return torch.device(name)


def _cap_memory(fraction: float, device: torch.device) -> None:
    """torch.cuda.set_per_process_memory_fraction with an explicit device index: it refuses a
    torch.device("cuda") without one (ValueError on the H200 run)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plan:
    """Sizes of one run: contexts, block and budget rules, steps; small on the CPU and with --quick."""

    def __init__(self, device: torch.device, shape: str, quick: bool, prefetch_blocks: int | None = None) -> None:
        big = shape != "tiny"
        # decode prefetch (SparseConfig.prefetch_blocks): on by default where copies can overlap compute
        self.prefetch = (4 if device.type == "cuda" else 0) if prefetch_blocks is None else prefetch_blocks
        self.block = 64 if big else 16
        self.sinks = self.block
        self.window = 2 * self.block
        self.chunk = 16384 if device.type == "cuda" else 4096  # prefill chunk (bounds activation memory)
        self.steps = 4 if quick else 8
        if device.type == "cuda":
            self.decode_contexts: Sequence[int] = (8192, 32768) if quick else (32768, 131072)
            self.prefill_contexts: Sequence[int] = (8192,) if quick else (32768,)
            self.batched_context = 16384 if quick else 65536
            self.cap_context = 8192 if quick else 32768  # max_context: memory capped at this much dense KV
        else:
            self.decode_contexts = (2048, 4096) if quick else (4096, 16384)
            self.prefill_contexts = (1024, 4096) if quick else (4096, 8192)
            self.batched_context = 1024
            self.cap_context = 1024

    def budget(self, context: int, fraction: float = 1 / 16) -> int:
        floor = (self.sinks // self.block + self.window // self.block + 1) * self.block
        return max(int(context * fraction) // self.block * self.block, floor)


def _sparse_cache(model, plan: Plan, budget: int, batch: int, context: int, hold_prefill: bool = True,
                  prefault: bool = False):
    """A DRAM store for `batch` sequences of `context` tokens and a KVTierSparseCache over it.

    prefault: touch every page of the store's DRAM pool now (a fresh pool's pages are faulted in by
    the first writes, which a long-running store pays once at start; prefill_row times a fresh store
    per repeat, so without this it would time the kernel's page faults).

    hold_prefill: a chunked prefill keeps the context it gathered on the device, as a dense prefill
    keeps its KV (sparse.dense_stream_tokens = the context); False sets it to one prefill chunk, so
    longer contexts are streamed back from the store chunk by chunk (max_context: sparse must fit
    where dense does not)."""
    from kvtier.connectors.transformers.sparse import KVTierSparseCache, model_kv_layout
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.sparse import SparseConfig, sparse_store_layout
    from kvtier.store.tiered import TieredStore

    dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[model.dtype]
    layout = model_kv_layout(model.config, dtype)
    kv_bytes = batch * (context + 1024) * layout.token_bytes_per_layer() * layout.num_layers
    store = TieredStore(StoreConfig(chunk_tokens=plan.block,
                                    memory=MemoryTierConfig(capacity_bytes=int(kv_bytes * 1.1) + (64 << 20))),
                        sparse_store_layout(layout))
    if prefault and store.memory is not None:
        import ctypes

        region = store.memory.pool_region()
        ctypes.memset(region.address, 0, region.nbytes)
    # not holding: only a chunk's worth is gathered; longer contexts stream back from the store
    stream = {"dense_stream_tokens": context + plan.chunk if hold_prefill else plan.chunk}
    cfg = SparseConfig(policy="quest", budget_tokens=budget, block_tokens=plan.block, sink_tokens=plan.sinks,
                       window_tokens=plan.window, prefetch_blocks=plan.prefetch, **stream)
    return store, KVTierSparseCache(store, cfg, model_config=model.config)


def _prefill(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Logits of the last position after a chunked prefill into `cache` (dense or sparse)."""
    out = None
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, lo : lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    assert out is not None
    return out.logits[:, -1]


def _decode(model, cache, logits: torch.Tensor, steps: int, drift: float, device: torch.device,
            after_step: Callable[[int], None] | None = None) -> list[float]:
    """Seconds of each decode step (inputs as the module docstring says); after_step(i) after step i."""
    embed = model.get_input_embeddings()
    prev = None
    times = []
    with torch.no_grad():
        for _ in range(steps):
            x = embed(logits.argmax(-1, keepdim=True))  # [b, 1, hidden]
            if prev is not None and drift:
                mixed = drift * prev + math.sqrt(1 - drift**2) * x
                x = mixed * (x.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-6))
            prev = x
            _sync(device)
            t = time.perf_counter()
            logits = model(inputs_embeds=x, past_key_values=cache, use_cache=True).logits[:, -1]
            _sync(device)
            times.append(time.perf_counter() - t)
            if after_step is not None:
                after_step(len(times) - 1)
    return times


def _peak_during(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """fn()'s result and the peak torch.cuda.memory_allocated while it ran (None off CUDA)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, int(torch.cuda.max_memory_allocated(device))


def _traced_step(model, cache, device: torch.device) -> dict[str, Any]:
    """One more decode step (not timed, not counted in churn) under kvtier.bench.sparse_memory's
    LiveTensorTracker: the peak of the bytes it allocated on the device, by allocating function
    (kvtier's innermost frame, else the model's), and on CUDA max_memory_allocated over it minus what
    was allocated before it. Tells a GPU run which transients a decode step's peak is made of."""
    from kvtier.bench.sparse_memory import LiveTensorTracker

    x = torch.randint(0, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0)).to(device)
    tracker = LiveTensorTracker(device_type=device.type)
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), tracker:
        model(input_ids=x, past_key_values=cache, use_cache=True)
    _sync(device)
    cuda_peak = int(torch.cuda.max_memory_allocated(device)) - base if device.type == "cuda" else None
    top = dict(sorted(tracker.at_peak.items(), key=lambda kv: -kv[1])[:12])
    return {"transient_peak_bytes": tracker.peak, "at_peak": top, "cuda_peak_over_before_bytes": cuda_peak}


def _dense_decode_cache(model, max_tokens: int) -> Any:
    """The dense arm's cache for decode rows: preallocated (transformers' StaticCache), as the CPU
    decode bench's dense reads a preallocated KV. A DynamicCache concatenates every layer's whole K
    and V with each new token (reading and writing the cache once more per step), which would make
    the baseline slower than dense decode is (an audit found it)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_tokens)


def decode_row(model, plan: Plan, device: torch.device, context: int, drift: float,
               weights_bytes: int | None) -> dict[str, Any]:
    from kvtier.connectors.transformers.sparse import ATTN_NAME

    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    budget = plan.budget(context)

    model.set_attn_implementation("sdpa")
    dense_cache: Any = _dense_decode_cache(model, context + plan.steps)
    logits = _prefill(model, ids, dense_cache, plan.chunk)
    dense_times, dense_peak = _peak_during(device, lambda: _decode(model, dense_cache, logits, plan.steps, drift,
                                                                  device))
    dense_cache = None  # its KV freed before the sparse run measures its peak

    model.set_attn_implementation(ATTN_NAME)
    store, cache = _sparse_cache(model, plan, budget, 1, context)
    try:
        logits = _prefill(model, ids, cache, plan.chunk)
        cache.flush()
        cache.release_prefill()  # the context prefill kept gathered is not decode's: freed before its peak
        _sync(device)
        # what is allocated on the GPU before decode beyond the weights and what the cache says it holds
        # (working sets, summaries, ...): a leftover of prefill would show here
        held_before = sum(sum(s.device_bytes().values()) for s in cache.sequences)
        unaccounted = (torch.cuda.memory_allocated(device) - weights_bytes - held_before
                       if device.type == "cuda" and weights_bytes is not None else None)
        first_fill = [0]
        first_fill_s = [0.0]

        def after(i: int) -> None:  # the first step fills the whole working set: churn counts the rest
            if i == 0:
                first_fill[0] = sum(ws.fetched_slices for seq in cache.sequences for ws in seq.working)
                first_fill_s[0] = sum(seq.fetch_seconds for seq in cache.sequences)

        sparse_times, sparse_peak = _peak_during(device, lambda: _decode(model, cache, logits, plan.steps, drift,
                                                                        device, after))
        (seq,) = cache.sequences
        slices = sum(ws.fetched_slices for ws in seq.working) - first_fill[0]
        picks = seq.config.retrieval_slots * seq.layout.num_kv_heads * seq.layout.num_layers
        fast_bytes = cache.fast_tier_bytes()
        held = seq.device_bytes()  # what the cache holds on the device after decode, by kind
        pf = seq._prefetch
        prefetch = {"prefetch_blocks": plan.prefetch,
                    "prefetched_slices": pf.prefetched_slices if pf is not None else 0,
                    "prefetch_used_slices": pf.used_slices if pf is not None else 0,
                    "fetched_slices": slices,
                    # host wall time of the working sets' fills (store gather + copy to the device), per step
                    "fill_ms_per_step": 1e3 * (seq.fetch_seconds - first_fill_s[0]) / max(1, plan.steps - 1)}
        traced = _traced_step(model, cache, device)
        cache.close()
    finally:
        store.close()
        model.set_attn_implementation("sdpa")
    # the first step warms up (and, for sparse, fills the whole working set): left out
    return {"context_tokens": context, "budget_tokens": budget, "drift": drift,
            "retrieval_churn": slices / max(1, picks * (plan.steps - 1)),
            "dense_token_ms": 1e3 * statistics.median(dense_times[1:]),
            "sparse_token_ms": 1e3 * statistics.median(sparse_times[1:]),
            "dense_kv_gpu_bytes": None if dense_peak is None or weights_bytes is None else dense_peak - weights_bytes,
            "sparse_kv_gpu_bytes": None if sparse_peak is None or weights_bytes is None else sparse_peak - weights_bytes,
            "sparse_fast_tier_bytes": fast_bytes, "sparse_held_bytes": held, "steps": plan.steps,
            "sparse_unaccounted_before_decode_bytes": unaccounted, "sparse_traced_step": traced,
            "dense_cache": "StaticCache", **prefetch}


def prefill_row(model, plan: Plan, device: torch.device, context: int, repeats: int = 3) -> dict[str, Any]:
    """Seconds of a chunked prefill: plain sdpa with a DynamicCache against the same forwards through
    KVTierSparseCache (blocks and summaries written to the store, its saves flushed). Medians of
    `repeats`, after one short warm-up of each."""
    from transformers import DynamicCache

    from kvtier.connectors.transformers.sparse import ATTN_NAME

    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1)).to(device)

    def dense(n: int) -> float:
        model.set_attn_implementation("sdpa")
        _sync(device)
        t = time.perf_counter()
        _prefill(model, ids[:, :n], DynamicCache(config=model.config), plan.chunk)
        _sync(device)
        return time.perf_counter() - t

    def sparse(n: int) -> float:
        model.set_attn_implementation(ATTN_NAME)
        store, cache = _sparse_cache(model, plan, plan.budget(n), 1, n, prefault=True)
        try:
            _sync(device)
            t = time.perf_counter()
            _prefill(model, ids[:, :n], cache, plan.chunk)
            cache.flush()
            _sync(device)
            return time.perf_counter() - t
        finally:
            store.close()
            model.set_attn_implementation("sdpa")

    warm = min(context, 4 * plan.block * 8)
    dense(warm)
    sparse(warm)
    d, s = [], []
    for _ in range(repeats):  # interleaved, so drift in the machine's speed hits both alike
        d.append(dense(context))
        s.append(sparse(context))
    return {"context_tokens": context, "dense_s": statistics.median(d), "sparse_s": statistics.median(s),
            "chunk_tokens": plan.chunk, "repeats": repeats, "store_pool_prefaulted": True}


def _runs(fn: Callable[[], Any]) -> str | None:
    """None when fn() completes, else the out-of-memory it raised, named (the cache is emptied after)."""
    from kvtier.sparse.errors import WorkingSetMemoryError

    try:
        fn()
        return None
    except (torch.OutOfMemoryError, WorkingSetMemoryError) as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        torch.cuda.empty_cache()


def max_context_row(model, plan: Plan, device: torch.device, weights_bytes: int, quick: bool) -> dict[str, Any]:
    """CUDA only: with the process capped at the weights plus the KV of `cap_context` tokens (dense
    KV bytes), the longest context dense prefills and decodes, and whether sparse completes each."""
    from transformers import DynamicCache

    from kvtier.connectors.transformers.sparse import ATTN_NAME, model_kv_layout

    layout = model_kv_layout(model.config, "bfloat16" if model.dtype == torch.bfloat16 else "float32")
    per_token = layout.token_bytes_per_layer() * layout.num_layers
    cap_context = plan.cap_context
    # weights + the cap's KV + activations of a prefill chunk (a generous fixed allowance)
    cap = weights_bytes + cap_context * per_token + (4 << 30)
    total = torch.cuda.get_device_properties(device).total_memory
    _cap_memory(min(1.0, cap / total), device)
    contexts = [cap_context * m for m in ((1, 2) if quick else (1, 2, 4))]
    dense_max, sparse_done = 0, 0
    failures: dict[str, dict[str, str]] = {}
    try:
        for ctx in contexts:
            ids = torch.randint(0, model.config.vocab_size, (1, ctx)).to(device)

            def dense(ids: torch.Tensor = ids) -> None:
                model.set_attn_implementation("sdpa")
                c = DynamicCache(config=model.config)
                _decode(model, c, _prefill(model, ids, c, plan.chunk), 2, 0.0, device)

            def sparse(ids: torch.Tensor = ids, ctx: int = ctx) -> None:
                model.set_attn_implementation(ATTN_NAME)
                store, c = _sparse_cache(model, plan, plan.budget(ctx), 1, ctx, hold_prefill=False)
                try:
                    _decode(model, c, _prefill(model, ids, c, plan.chunk), 2, 0.0, device)
                finally:
                    store.close()

            for name, fn in (("dense", dense), ("sparse", sparse)):
                error = _runs(fn)
                if error is not None:  # what stopped it, so a failed run says why
                    failures.setdefault(str(ctx), {})[name] = error
                elif name == "dense":
                    dense_max = ctx
                else:
                    sparse_done = ctx
    finally:
        _cap_memory(1.0, device)
        model.set_attn_implementation("sdpa")
    return {"gpu_memory_cap_bytes": int(cap), "dense_max_tokens": dense_max, "sparse_completed_tokens": sparse_done,
            "contexts_tried": contexts, "failures": failures}


def batched_row(model, plan: Plan, device: torch.device, weights_bytes: int) -> dict[str, Any]:
    """CUDA only: KV memory capped at the KV of four sequences of `batched_context` for both; dense
    decodes a batch of four, sparse the largest batch whose working sets and summaries fit the same
    cap (bounded by what the host store can hold, and by 8: each batch is prefilled in one forward,
    whose activations grow with it); tokens/s of each. The cap is set after the prefill, for the
    decode steps (a chunked prefill of a batch through the sparse cache would stream the growing
    context back from the store for every chunk)."""
    import os

    from kvtier.connectors.transformers.sparse import ATTN_NAME, model_kv_layout

    ctx = plan.batched_context
    layout = model_kv_layout(model.config, "bfloat16" if model.dtype == torch.bfloat16 else "float32")
    seq_kv = ctx * layout.token_bytes_per_layer() * layout.num_layers
    kv_cap = 4 * seq_kv
    budget = plan.budget(ctx)
    fast_per_seq = 2 * (budget // plan.block) * plan.block * layout.token_bytes_per_layer() * layout.num_layers * 1.25
    host_seqs = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.6 // seq_kv)
    sparse_batch = max(1, min(int(kv_cap // fast_per_seq), host_seqs, 8))
    total = torch.cuda.get_device_properties(device).total_memory
    cap_fraction = min(1.0, (weights_bytes + kv_cap + (6 << 30)) / total)
    out: dict[str, Any] = {"context_tokens": ctx, "budget_tokens": budget, "gpu_kv_cap_bytes": kv_cap,
                           "dense_cache": "StaticCache"}
    try:
        for name, batch in (("dense", 4), ("sparse", sparse_batch)):
            ids = torch.randint(0, model.config.vocab_size, (batch, ctx)).to(device)
            store = None
            if name == "dense":
                model.set_attn_implementation("sdpa")
                cache: Any = _dense_decode_cache(model, ctx + plan.steps)
            else:
                model.set_attn_implementation(ATTN_NAME)
                store, cache = _sparse_cache(model, plan, budget, batch, ctx)
            try:
                logits = _prefill(model, ids, cache, ctx)
                if store is not None:
                    cache.release_prefill()  # the context prefill kept gathered: not decode's, freed before the cap
                torch.cuda.empty_cache()
                _cap_memory(cap_fraction, device)
                times = _decode(model, cache, logits, plan.steps, 0.0, device)
                out[f"{name}_batch"] = batch
                out[f"{name}_tokens_per_s"] = batch / statistics.median(times[1:])
            except (torch.OutOfMemoryError, MemoryError) as e:
                out[f"{name}_batch"] = batch
                out[f"{name}_tokens_per_s"] = 0.0
                out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                _cap_memory(1.0, device)
                if store is not None:
                    store.close()
                del cache
                torch.cuda.empty_cache()
    finally:
        _cap_memory(1.0, device)
        model.set_attn_implementation("sdpa")
    return out


def device_rows(device_name: str = "cpu", shape: str | None = None, dtype_name: str | None = None,
                quick: bool = False, prefetch_blocks: int | None = None,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The device part of `bench sparse` (see the module docstring). `on_row(out)` is called with the
    results so far after every row (the bench writes its JSON then: a run cut short keeps its rows)."""
    def done_row() -> None:
        if on_row is not None:
            on_row(out)

    from kvtier.connectors.transformers.sparse import register

    device = parse_device(device_name)
    shape = shape or ("llama-8b" if device.type == "cuda" else "tiny")
    dtype_name = dtype_name or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype {dtype_name!r}: expected one of {', '.join(DTYPES)}")
    plan = Plan(device, shape, quick, prefetch_blocks)
    register()
    max_pos = 2 * max(max(plan.decode_contexts), plan.batched_context, max(plan.prefill_contexts)) + 4096
    weights_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = build_model(shape, device, DTYPES[dtype_name], max_pos)
    weights = torch.cuda.memory_allocated(device) - weights_before if device.type == "cuda" else None
    out: dict[str, Any] = {"setup": {"device": device.type, "shape": shape, "dtype": dtype_name, "quick": quick,
                                     "block_tokens": plan.block, "policy": "quest", "prefetch_blocks": plan.prefetch,
                                     "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                     "weights_gpu_bytes": weights}}
    rows: list[dict[str, Any]] = []
    out["gpu_decode"] = rows
    for ctx in plan.decode_contexts:
        # drift 0.98 (the targets) at every context; drift 0 (reported without a target) at the
        # smallest only on CUDA's full run, to keep the whole CUDA run under 6 minutes
        full_cuda = device.type == "cuda" and not quick
        for drift in ((0.0, 0.98) if ctx == plan.decode_contexts[0] or not full_cuda else (0.98,)):
            row = decode_row(model, plan, device, ctx, drift, weights)
            rows.append(row)
            done_row()
            print(f"gpu_decode {device.type} {shape} ctx {ctx} budget {row['budget_tokens']} drift {drift}: dense "
                  f"{row['dense_token_ms']:.1f} ms sparse {row['sparse_token_ms']:.1f} ms a token, churn "
                  f"{row['retrieval_churn']:.2f}, prefetch used {row['prefetch_used_slices']} of "
                  f"{row['prefetched_slices']} slices read ahead ({row['fetched_slices']} filled)", flush=True)
    out["prefill"] = []
    for ctx in plan.prefill_contexts:
        row = prefill_row(model, plan, device, ctx, repeats=2 if quick else 3)
        out["prefill"].append(row)
        done_row()
        print(f"prefill {device.type} {shape} ctx {ctx}: dense {row['dense_s']:.3f} s, through the sparse cache "
              f"{row['sparse_s']:.3f} s ({row['sparse_s'] / row['dense_s']:.2f}x)", flush=True)
    if device.type == "cuda":
        assert weights is not None
        out["max_context"] = max_context_row(model, plan, device, weights, quick)
        done_row()
        out["batched"] = batched_row(model, plan, device, weights)
    else:
        why = "needs a CUDA device (a GPU memory cap and GPU memory peaks)"
        out["max_context"] = {"gpu_memory_cap_bytes": None, "dense_max_tokens": None,
                              "sparse_completed_tokens": None, "skipped": why}
        out["batched"] = {"context_tokens": None, "dense_batch": None, "sparse_batch": None,
                          "dense_tokens_per_s": None, "sparse_tokens_per_s": None, "skipped": why}
    return out
