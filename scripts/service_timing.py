"""Drive a real `python -m kvtier.service` the way the vLLM connector does, timing every call.

    python scripts/service_timing.py [--disk] [--dram-chunks N] [--prefill-s S] [--rounds R]

A scheduler client (lookup with lease) and a worker client (load with the lease, release;
begin_save / write_layer per layer / commit) on separate connections, one request at a
time like `kvtier bench vllm`'s runner: D documents of 16 chunks (128 tokens, 12 layers x
8 heads x 64 dims, float32), a warm-up round that saves each, then measured rounds. With
--disk the DRAM tier is smaller than the working set and the page cache is dropped before
each request. Prints every call slower than --slow-ms and the hits per document and round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from kvtier.client import connect
from kvtier.connectors.vllm.runner import drop_page_cache
from kvtier.core.layout import KVLayout

LAYOUT = KVLayout(num_layers=12, num_kv_heads=8, head_size=64, dtype="float32")
CHUNK = 128


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk", action="store_true")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-chunks", type=int, default=16)
    ap.add_argument("--dram-chunks", type=int, default=0, help="default: 19 with --disk, else 2x the working set")
    ap.add_argument("--prefill-s", type=float, default=0.6, help="simulated prefill time of a whole document")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slow-ms", type=float, default=100.0)
    args = ap.parse_args()

    folder = tempfile.mkdtemp(prefix="kvt-drv-", dir="/tmp")
    cb = LAYOUT.chunk_bytes(CHUNK)
    lb = LAYOUT.layer_bytes(CHUNK)
    slots = args.dram_chunks or (19 if args.disk else 2 * args.docs * args.doc_chunks + 8)
    store: dict = {"chunk_tokens": CHUNK, "memory": {"capacity_bytes": slots * cb}}
    if args.disk:
        store["disk"] = {"root": os.path.join(folder, "disk")}
    sock = os.path.join(folder, "kv.sock")
    cfg = {"layout": {"num_layers": LAYOUT.num_layers, "num_kv_heads": LAYOUT.num_kv_heads,
                      "head_size": LAYOUT.head_size, "dtype": LAYOUT.dtype}, "store": store, "socket_path": sock}
    cfg_path = os.path.join(folder, "service.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.service", "--config", cfg_path, "--log-level", "WARNING"])
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    sched = connect({"mode": "service", "socket_path": sock})
    worker = connect({"mode": "service", "socket_path": sock})
    calls: list[tuple[str, str, float]] = []

    def timed(tag: str, name: str, fn):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        calls.append((tag, name, dt))
        if dt * 1e3 > args.slow_ms:
            print(f"  SLOW {tag} {name}: {dt * 1e3:.0f} ms", flush=True)
        return out

    rng = np.random.default_rng(0)
    layer_src = [rng.integers(0, 255, lb, dtype=np.uint8) for _ in range(LAYOUT.num_layers)]
    dests = [[np.empty(lb, np.uint8) for _ in range(LAYOUT.num_layers)] for _ in range(args.doc_chunks)]

    def keys_of(doc: int) -> list[bytes]:
        out, prev = [], b"root"
        for i in range(args.doc_chunks):
            prev = hashlib.blake2b(prev + bytes([doc, i]), digest_size=16).digest()
            out.append(prev)
        return out

    root = hashlib.blake2b(b"root", digest_size=16).digest()

    def request(tag: str, doc: int) -> tuple[int, tuple[str, ...], int]:
        keys = keys_of(doc)
        if args.disk:
            drop_page_cache(os.path.join(folder, "disk"))
        t0 = time.perf_counter()
        reply = timed(tag, "lookup", lambda: sched.lookup(keys, lease=True))
        hits = reply.hits
        if hits:
            res = timed(tag, "load", lambda: worker.load(keys[:hits], dests[:hits], None, reply.lease_id).wait())
            timed(tag, "release", lambda: worker.release(reply.lease_id))
            if res.failed:
                hits = res.loaded
        todo = keys[hits:]
        saved = 0
        if todo:
            parent = keys[hits - 1] if hits else root
            sess = timed(tag, "begin_save", lambda: worker.begin_save(todo, parent, hits))
            per_layer = args.prefill_s * len(todo) / args.doc_chunks / LAYOUT.num_layers
            for layer in range(LAYOUT.num_layers):
                time.sleep(per_layer)
                timed(tag, "write_layer", lambda layer=layer: sess.write_layer(layer, [layer_src[layer]] * len(todo)))
            r = timed(tag, "commit", lambda: sess.commit().wait())
            saved = r.in_memory
        ttft = time.perf_counter() - t0
        calls.append((tag, "request", ttft))
        return hits, reply.tiers, saved

    try:
        for d in range(args.docs):
            hits, tiers, saved = request("warm", d)
            print(f"warm doc {d}: hits {hits} saved(in_memory) {saved}", flush=True)
        for r in range(args.rounds):
            for d in range(args.docs):
                hits, tiers, saved = request(f"r{r}", d)
                print(f"round {r} doc {d}: hits {hits}/{args.doc_chunks} "
                      f"(memory {tiers.count('memory')}, disk {tiers.count('disk')}) saved {saved}", flush=True)
        for name in ("lookup", "load", "release", "begin_save", "commit", "request"):
            xs = sorted(dt for _t, n, dt in calls if n == name)
            if xs:
                print(f"{name:11s} n={len(xs):3d} p50 {xs[len(xs) // 2] * 1e3:7.1f} ms  max {xs[-1] * 1e3:7.1f} ms")
        st = sched.stats()
        print("disk errors:", st.get("metrics", {}).get("kvtier_write_failures_total"), "slots:", st.get("slots"))
    finally:
        sched.close()
        worker.close()
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
