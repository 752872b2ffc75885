#!/usr/bin/env python3
"""Host-side cost of publishing a layer-by-layer save (issue 17's miss_published_s), without a GPU.

A SaveBatch of CHUNKS chunks (Llama-8B's KV layout by default: 32 layers, 8 KV heads x 128, bf16)
is filled layer by layer, one layer every --layer-ms (the forward computing it), then committed:

    staged  each layer's bytes copied from a host staging buffer into the slots (write_layer, as
            SaveCopies' worker does for a staged save), then commit (on main: commit checksums
            every section on one thread)
    direct  each layer's bytes placed in the slots by a stand-in for the GPU's copy engine (not
            timed: on CUDA the DMA costs the host nothing), then mark_filled (its checksums start on
            the verify threads), then commit

Reported per mode, median of --repeats: publish_s (from the last layer's bytes being available until
commit returned: what a miss's publish waits for after its forward) and worker_s (host time spent in
the save calls over the whole save). Runs on main's code too (staged only):
`PYTHONPATH=/path/to/main/src python scripts/bench_save_publish.py --modes staged`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.core.layout import KVLayout
from kvtier.store import TieredStore


def run(mode: str, store: TieredStore, keys: list[bytes], root: bytes, data: np.ndarray,
        layer_ms: float) -> tuple[float, float]:
    layers = store.layout.num_layers
    lb = store.layer_bytes
    batch = store.begin_save(keys, root, 0)
    worker = 0.0
    if mode == "direct":  # as the transformers connector on CUDA: checksums on the store's verify threads
        batch.checksum_threads = True
        pool = store.pool_array()
        offsets = batch.slot_offsets()
    ready = time.perf_counter()
    for layer in range(layers):
        if layer_ms:
            time.sleep(layer_ms / 1e3)
        if mode == "direct":
            for i, off in enumerate(offsets):  # the GPU's copy into the page-locked slot (free for the host)
                pool[off + layer * lb:off + (layer + 1) * lb] = data[i, layer]
        ready = time.perf_counter()
        if mode == "direct":
            batch.mark_filled(layer, 1)
        else:
            batch.write_layer(layer, [data[i, layer] for i in range(len(keys))])
        worker += time.perf_counter() - ready
    t0 = time.perf_counter()
    batch.commit().wait()
    done = time.perf_counter()
    return done - ready, worker + done - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--layer-ms", type=float, default=0.0, help="time between layers (the forward's per-layer time)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="staged,direct")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    layout = KVLayout(num_layers=args.layers, num_kv_heads=8, head_size=128, dtype="bfloat16")
    cb = layout.chunk_bytes(args.chunk_tokens)
    store = TieredStore(StoreConfig(chunk_tokens=args.chunk_tokens,
                                    memory=MemoryTierConfig(capacity_bytes=(args.chunks + 1) * cb)), layout)
    lb = store.layer_bytes
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(args.chunks, args.layers, lb), dtype=np.uint8)
    root = Namespace("bench-save-publish", layout.layout_id(args.chunk_tokens)).root()
    out: dict[str, dict[str, float]] = {}
    for mode in args.modes.split(","):
        publish, worker = [], []
        for r in range(args.repeats):
            tokens = [r * 7919 + t + (mode == "direct") * 10**6 for t in range(args.chunks * args.chunk_tokens)]
            keys = list(chunk_keys(root, tokens, args.chunk_tokens))
            p, w = run(mode, store, keys, root, data, args.layer_ms)
            publish.append(p)
            worker.append(w)
            for k in keys:
                store.memory.delete(k)  # type: ignore[union-attr]
        out[mode] = {"publish_s": statistics.median(publish), "worker_s": statistics.median(worker),
                     "publish_runs_s": publish, "worker_runs_s": worker}  # type: ignore[dict-item]
        print(f"{mode:>6}: {args.chunks} chunks x {args.layers} layers ({args.chunks * cb / 2**20:.0f} MiB), "
              f"layer every {args.layer_ms} ms: publish after the last layer {out[mode]['publish_s'] * 1e3:.1f} ms, "
              f"save calls {out[mode]['worker_s'] * 1e3:.1f} ms (median of {args.repeats})")
    store.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "modes": out}, f, indent=1)


if __name__ == "__main__":
    main()
