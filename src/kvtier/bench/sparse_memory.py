"""Where a sparse decode step's memory goes: the peak of live tensor bytes, split by what allocated them.

    LiveTensorTracker        a TorchDispatchMode that sees every tensor an op allocates, labels it with
                             the innermost kvtier function (file:function:line) that ran the op, and keeps
                             the peak of the bytes still alive and what they were at that peak
    memory_breakdown(...)    a SparseKV of the given shape (few layers, a long context of random KV written
                             straight in), a few decode steps traced; returns held bytes by kind, the
                             transient peak by allocator, and both relative to the dense KV of the layers
    main()                   `python scripts/sparse_memory.py --device cpu|cuda ...` prints it and writes JSON

Why a dispatch mode rather than the allocator: the CPU has no memory_allocated, and on CUDA the
allocator's peak says how much but not who. The tracker counts a storage as live from the op that
made it until no tensor refers to it (polled after every op, so the peak is exact at op
granularity; scratch a kernel allocates internally is not seen). Views and in-place results share
an input's storage and are not counted again. On CUDA the same run also reports
torch.cuda.max_memory_allocated during the traced steps minus memory_allocated before them, which
is what `bench sparse`'s `sparse_kv_gpu_bytes` counts (beside the model's own activations).

What it cannot see on the CPU: `_fill_staged`'s host -> device copy is the host rows themselves
there (no device copy), so a CPU run with --stage shows the indexing transients but not the
device rows a CUDA fill allocates (the CUDA run does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SELF = __file__


def _caller_label() -> str:
    """module.function:line of the innermost frame below the dispatch outside torch: kvtier's own
    functions (sparse.kv.attend:...), or a library's (transformers.models.llama.modeling_llama...)
    for the model's activations."""
    f: FrameType | None = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name == _SELF and f.f_code.co_name == "memory_breakdown":
            return "memory_breakdown (the step's q, k, v)"
        if name != _SELF and "/torch/" not in name:
            if "/kvtier/" in name:
                short = name.rsplit("/kvtier/", 1)[1]
            elif "-packages/" in name:
                short = name.rsplit("-packages/", 1)[1]
            else:
                short = name.rsplit("/", 1)[-1]
            return f"{short.removesuffix('.py').replace('/', '.')}.{f.f_code.co_name}:{f.f_lineno}"
        f = f.f_back
    return "?"


@dataclass(slots=True)
class _Live:
    ref: StorageWeakRef
    nbytes: int
    label: str


# buffers SparseKV keeps in host memory by design (page-locked on CUDA): on a CPU run they are CPU
# tensors like the rest, so they are told apart by the function that allocates them
HOST_BUFFERS = ("sparse.staging.rows", "sparse.kv._fetch", "sparse.prefetch._fetch")


@dataclass
class LiveTensorTracker(TorchDispatchMode):
    """Peak of live bytes of the tensors allocated while active (not those allocated before), by label.

    Counts tensors on `device`'s type only; host tensors there (all of them off the CPU, those of
    HOST_BUFFERS on it) are ignored except for `host_bytes`, the most each label allocated.
    `mark(name)` starts a new phase: the tracker then also keeps each phase's own peak."""

    device_type: str = "cpu"
    host_bytes: dict[str, int] = field(default_factory=dict)
    live: dict[tuple[str, int], _Live] = field(default_factory=dict)
    current: int = 0
    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    phase_peaks: dict[str, int] = field(default_factory=dict)
    phase_at_peak: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def mark(self, phase: str) -> None:
        self._prune()
        self.phase = phase
        self.phase_peaks[phase] = self.current
        self.phase_at_peak[phase] = self._by_label()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._prune()  # `current` as of leaving: what is still alive of what was allocated inside

    def _prune(self) -> None:
        gone = [key for key, e in self.live.items() if e.ref.expired()]
        for key in gone:
            self.current -= self.live.pop(key).nbytes

    def _by_label(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.live.values():
            out[e.label] += e.nbytes
        return dict(out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = {(str(t.device), t.untyped_storage().data_ptr()) for t in flat_in if isinstance(t, torch.Tensor)}
        # drop what died since the last op first: an allocator hands a freed address out again at once,
        # and a new storage at the address of a dead one must not pass for the dead one
        self._prune()
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        label = None
        for t in flat_out:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key in inputs or st.nbytes() == 0 or (key in self.live and not self.live[key].ref.expired()):
                continue  # a view or in-place result of an input, or already counted
            label = label or _caller_label()
            if t.device.type != self.device_type or (t.device.type == "cpu" and label.startswith(HOST_BUFFERS)):
                self.host_bytes[label] = max(self.host_bytes.get(label, 0), st.nbytes())
                continue
            if key in self.live:  # a dead storage's address, reused
                self.current -= self.live.pop(key).nbytes
            self.live[key] = _Live(StorageWeakRef(st), st.nbytes(), label)
            self.current += st.nbytes()
        self._prune()
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = self._by_label()
        if self.phase and self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
            self.phase_at_peak[self.phase] = self._by_label()
        return out


def _store_for(layout, block: int, context: int, steps: int):
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.sparse import sparse_store_layout
    from kvtier.store.tiered import TieredStore

    kv_bytes = (context + steps + block) * layout.token_bytes_per_layer() * layout.num_layers
    return TieredStore(StoreConfig(chunk_tokens=block, memory=MemoryTierConfig(capacity_bytes=int(kv_bytes * 1.1)
                                                                               + (16 << 20))),
                       sparse_store_layout(layout))


def memory_breakdown(*, device: str = "cpu", layers: int = 2, kv_heads: int = 8, q_heads: int = 32,
                     head_size: int = 128, dtype: str = "bfloat16", context: int = 65536, block: int = 64,
                     budget_fraction: float = 1 / 16, policy: str = "quest", steps: int = 4,
                     prefetch_blocks: int = 0, stage_fetches: bool | None = None, write_chunk: int = 8192,
                     seed: int = 0, model_layers: int = 32, cuda_snapshot: str | None = None) -> dict[str, Any]:
    """Decode `steps` tokens through a SparseKV holding `context` tokens of random KV (see the module
    docstring); every size in bytes. Step 0 fills the whole working set; the later ones move only
    what the selection changed. Held bytes scale with the layers and a step's transients do not
    (layers run one at a time), so `*_at_model_layers` scales the held part to `model_layers`
    (32: the 8B shape) to say what the same peak is relative to a whole model's dense KV.
    `cuda_snapshot`: on CUDA, a torch.cuda.memory._snapshot() pickle of the traced steps (every
    allocation with its stack, for pytorch.org/memory_viz) is written there."""
    from kvtier.core.layout import KVLayout
    from kvtier.sparse import SparseConfig, SparseKV
    from kvtier.sparse.kv import TORCH_DTYPES

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads is not a multiple of {kv_heads} KV heads")
    dev = torch.device(device)
    tdt = TORCH_DTYPES[dtype]
    layout = KVLayout(layers, kv_heads, head_size, dtype)
    budget = max(int(context * budget_fraction) // block * block, 4 * block)
    cfg = SparseConfig(policy=policy, budget_tokens=budget, block_tokens=block, sink_tokens=block,
                       window_tokens=2 * block, prefetch_blocks=prefetch_blocks)
    store = _store_for(layout, block, context, steps)
    gen = torch.Generator(device=dev).manual_seed(seed)
    kv = SparseKV(store, cfg, layout, salt=b"memory", device=dev, stage_fetches=stage_fetches)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for lo in range(0, context, write_chunk):
                n = min(write_chunk, context - lo)
                for layer in range(layers):
                    k = torch.randn(kv_heads, n, head_size, generator=gen, device=dev, dtype=tdt)
                    v = torch.randn(kv_heads, n, head_size, generator=gen, device=dev, dtype=tdt)
                    kv.append(layer, k, v)
            kv.flush()
            kv.release_prefill()
            write_s = time.perf_counter() - t0
            held_before = kv.device_bytes()
            cuda = dev.type == "cuda"
            if cuda:
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                if cuda_snapshot:
                    # Python frames only: resolving C++ frames runs addr2line, which took minutes per
                    # snapshot with some binutils (torch later changed its default), past this step's cap
                    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
            tracker = LiveTensorTracker(device_type=dev.type)
            step_s = []
            with tracker:
                for step in range(steps):
                    tracker.mark(f"step{step}")
                    t1 = time.perf_counter()
                    for layer in range(layers):
                        k1 = torch.randn(kv_heads, 1, head_size, generator=gen, device=dev, dtype=tdt)
                        v1 = torch.randn(kv_heads, 1, head_size, generator=gen, device=dev, dtype=tdt)
                        kv.append(layer, k1, v1)
                        q = torch.randn(q_heads, 1, head_size, generator=gen, device=dev, dtype=tdt)
                        kv.attend(layer, q, head_size**-0.5)
                    if cuda:
                        torch.cuda.synchronize(dev)
                    step_s.append(time.perf_counter() - t1)
            cuda_peak = int(torch.cuda.max_memory_allocated(dev)) - base if cuda else None
            if cuda and cuda_snapshot:
                import pickle

                with open(cuda_snapshot, "wb") as f:
                    pickle.dump(torch.cuda.memory._snapshot(), f)
                torch.cuda.memory._record_memory_history(enabled=None)
            held_after = kv.device_bytes()
        kv.close()
    finally:
        store.close()
    dense = (context + steps) * layout.token_bytes_per_layer() * layers
    held = sum(held_before.values())
    steady = [f"step{i}" for i in range(1, steps)]
    steady_peak = max((tracker.phase_peaks[p] for p in steady), default=0)
    steady_phase = max(steady, key=lambda p: tracker.phase_peaks[p]) if steady else None

    def top(by: dict[str, int], n: int = 12) -> dict[str, int]:
        return dict(sorted(by.items(), key=lambda kv_: -kv_[1])[:n])

    return {
        "setup": {"device": dev.type, "layers": layers, "kv_heads": kv_heads, "q_heads": q_heads,
                  "head_size": head_size, "dtype": dtype, "context_tokens": context, "block_tokens": block,
                  "budget_tokens": budget, "policy": policy, "steps": steps, "prefetch_blocks": prefetch_blocks,
                  "stage_fetches": kv.stage_fetches, "write_s": write_s,
                  "step_ms": [1e3 * s for s in step_s]},
        "dense_kv_bytes": dense,
        "held_bytes": held_before,
        "held_after_bytes": held_after,
        "transient_peak_bytes": tracker.peak,
        "transient_at_peak": top(tracker.at_peak),
        "first_step_peak_bytes": tracker.phase_peaks.get("step0", 0),
        "steady_peak_bytes": steady_peak,
        "steady_at_peak": top(tracker.phase_at_peak[steady_phase]) if steady_phase else {},
        "peak_over_dense": (held + tracker.peak) / dense,
        "steady_peak_over_dense": (held + steady_peak) / dense,
        "held_over_dense": {k: v / dense for k, v in held_before.items()},
        "model_layers": model_layers,
        "peak_over_dense_at_model_layers": (held * model_layers / layers + tracker.peak) / (dense * model_layers / layers),
        "steady_peak_over_dense_at_model_layers": (held * model_layers / layers + steady_peak)
        / (dense * model_layers / layers),
        "host_buffers_bytes": tracker.host_bytes,
        "cuda_peak_bytes": cuda_peak,
        "cuda_peak_over_dense": None if cuda_peak is None else cuda_peak / dense,
        "cuda_peak_over_dense_at_model_layers": None if cuda_peak is None else
        (held * model_layers / layers + cuda_peak - held) / (dense * model_layers / layers),
    }


def format_breakdown(r: dict[str, Any]) -> str:
    mib = 2**20
    s = r["setup"]
    dense = r["dense_kv_bytes"]
    lines = [f"{s['device']} {s['layers']} layers x {s['kv_heads']} KV heads x {s['head_size']} {s['dtype']}, "
             f"context {s['context_tokens']}, budget {s['budget_tokens']} ({s['policy']}), "
             f"dense KV {dense / mib:.1f} MiB",
             "held (before decode):"]
    for k, v in r["held_bytes"].items():
        lines.append(f"  {k:<24} {v / mib:9.2f} MiB  {v / dense:7.4f} of dense")
    for name, peak, at in (("transient peak, all steps", r["transient_peak_bytes"], r["transient_at_peak"]),
                           ("transient peak, steps 1..", r["steady_peak_bytes"], r["steady_at_peak"])):
        lines.append(f"{name}: {peak / mib:.2f} MiB ({peak / dense:.4f} of dense)")
        for k, v in at.items():
            lines.append(f"  {k:<60} {v / mib:9.3f} MiB")
    if r["host_buffers_bytes"]:
        lines.append("host buffers allocated during decode (host memory on an accelerator, not counted): "
                     + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in r["host_buffers_bytes"].items()))
    lines.append(f"held + peak: {r['peak_over_dense']:.4f} of dense (1/{1 / r['peak_over_dense']:.1f}); "
                 f"steady {r['steady_peak_over_dense']:.4f} (1/{1 / r['steady_peak_over_dense']:.1f})")
    n = r["model_layers"]
    lines.append(f"at {n} layers (held x {n}/{s['layers']}, transients as measured): "
                 f"{r['peak_over_dense_at_model_layers']:.4f} of dense (1/{1 / r['peak_over_dense_at_model_layers']:.1f})")
    if r["cuda_peak_bytes"] is not None:
        lines.append(f"cuda max_memory_allocated - allocated before (held included): {r['cuda_peak_bytes'] / mib:.1f} MiB "
                     f"({r['cuda_peak_over_dense']:.4f} of dense; at {n} layers "
                     f"{r['cuda_peak_over_dense_at_model_layers']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--budget-fraction", type=float, default=1 / 16)
    p.add_argument("--policy", default="quest")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prefetch-blocks", type=int, default=0)
    p.add_argument("--stage", action="store_true", help="stage fetches through the host buffer (as on a GPU)")
    p.add_argument("--model-layers", type=int, default=32, help="layers to scale the held bytes to (8B: 32)")
    p.add_argument("--cuda-snapshot", default=None, help="CUDA only: write torch.cuda.memory._snapshot() here")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = memory_breakdown(device=a.device, layers=a.layers, kv_heads=a.kv_heads, q_heads=a.q_heads,
                         head_size=a.head_size, dtype=a.dtype, context=a.context, block=a.block,
                         budget_fraction=a.budget_fraction, policy=a.policy, steps=a.steps,
                         prefetch_blocks=a.prefetch_blocks, stage_fetches=True if a.stage else None,
                         model_layers=a.model_layers, cuda_snapshot=a.cuda_snapshot)
    print(format_breakdown(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
