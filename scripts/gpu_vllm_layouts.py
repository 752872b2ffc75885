"""Issue 17's vLLM GPU-adapter check: save -> load round trips of 2048 blocks through the batched
adapters and a real in-process store, under every KVCacheLayout order, with load speed against the
same run's pinned host -> device bandwidth; and whether the store's DRAM pool is page-locked.

    python scripts/gpu_vllm_layouts.py --device cuda --json OUT.json        (the GPU check)
    python scripts/gpu_vllm_layouts.py --device cuda --client service ...   (through a `kvtier serve`, as vLLM)
    python scripts/gpu_vllm_layouts.py --device cpu --layers 2 --heads 2 --head-size 8 --blocks 256 --direct on
                                                                            (a dry run of the same code)

The measured order's loads run twice: as the worker runs them by default (direct loads straight
out of the page-locked pool on CUDA: `direct_chunks` counts them) and through the staging arena
(`staged_*` keys), side by side in the same run.

No vLLM needed: the KV views are built the way vLLM 0.32's create_kv_cache_views builds them (one
flat buffer per cache, logical [L, B, H, N, C] with strides from the layout's permutation). The
first order runs with all --layers layers (the measured one, LBNHC: vLLM's default); the others
with --other-layers, enough to check they are bit-exact. Times: the load step from start_loads
to every layer placed (synchronized), after one warm-up round trip; the median of --repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from kvtier.bench.service import _wait_for_socket, start_service, stop_service
from kvtier.client.api import InProcessClient, StoreClient, connect
from kvtier.connectors.copy_engine import host_registry, host_to_device_probe, synchronize
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import LoadSpec, SaveSpec, StepPlan
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import TieredStore

ORDERS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "LHBNC": (0, 2, 1, 3, 4),
          "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def kv_views(lay: KVLayout, blocks: int, block: int, order: tuple[int, ...], device: str) -> list[torch.Tensor]:
    dtype = getattr(torch, lay.dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    shape = (lay.num_layers, blocks, lay.num_kv_heads, block, 2 * lay.head_size * esize)
    strides = [0] * 5
    cur = 1
    for dim in reversed(order):
        strides[dim] = cur
        cur *= shape[dim]
    raw = torch.zeros(cur, dtype=torch.int8, device=device)
    view5 = torch.as_strided(raw, shape, strides)
    return [view5[i].view(dtype) for i in range(lay.num_layers)]


def run_steps(worker: WorkerSide, plan: StepPlan) -> float:
    synchronize(worker.device)
    t0 = time.perf_counter()
    worker.start_step(plan)
    worker.start_loads()
    for name in worker.layer_names:
        worker.wait_layer(name)
        worker.save_layer(name)
    worker.finish_step()
    if worker._save_copies is not None:
        worker._save_copies.drain()  # saves published
    synchronize(worker.device)
    return time.perf_counter() - t0


def pool_check(client: StoreClient, device: str) -> dict[str, Any]:
    """Is the client's pool page-locked, and how fast does a slice of it reach the device."""
    region = client.lendable_pool()
    assert region is not None
    out: dict[str, Any] = {"pool_bytes": region.nbytes,
                           "registered": (region.address, region.nbytes) in host_registry().registered()}
    n = min(region.nbytes, 1 << 30)
    src = torch.frombuffer((ctypes.c_uint8 * n).from_address(region.address), dtype=torch.uint8)
    out["pool_is_pinned"] = bool(src.is_pinned()) if torch.device(device).type == "cuda" else False
    if torch.device(device).type == "cuda":
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out["pool_h2d_gbps"] = n / best / 1e9
    return out


def check_order(name: str, lay: KVLayout, args: argparse.Namespace, repeats: int, measured: bool) -> dict[str, Any]:
    blocks, block = args.blocks, args.block
    cfg = StoreConfig(chunk_tokens=block, hash_mode="sha256",
                      memory=MemoryTierConfig(capacity_bytes=(blocks + 8) * lay.chunk_bytes(block)))
    with contextlib.ExitStack() as stack:
        client = open_client(args.client, cfg, lay, stack)
        return check_order_with(client, name, lay, args, repeats, measured)


def open_client(kind: str, cfg: StoreConfig, lay: KVLayout, stack: contextlib.ExitStack) -> StoreClient:
    """An in-process store, or a `kvtier serve` started here (what vLLM's worker talks to) and its client."""
    if kind == "inprocess":
        return stack.enter_context(InProcessClient(TieredStore(cfg, lay)))
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvt-", dir="/tmp"))
    assert cfg.memory is not None
    sock, proc = start_service(folder, lay, cfg.chunk_tokens, cfg.memory.capacity_bytes, metrics=False)
    stack.callback(stop_service, proc)
    _wait_for_socket(sock, proc, timeout=60.0)
    return stack.enter_context(connect({"mode": "service", "socket_path": sock}, layout=lay))


def check_order_with(client: StoreClient, name: str, lay: KVLayout, args: argparse.Namespace, repeats: int,
                     measured: bool) -> dict[str, Any]:
    blocks, block = args.blocks, args.block
    names = [f"model.layers.{i}.self_attn.attn" for i in range(lay.num_layers)]
    src = dict(zip(names, kv_views(lay, blocks, block, ORDERS[name], args.device), strict=True))
    g = torch.Generator(device=args.device).manual_seed(1)
    for kv in src.values():
        kv.copy_(torch.randn(kv.shape, generator=g, device=args.device).to(kv.dtype))
    root = client.namespace(f"gpu-layouts-{name}").root()
    keys = client.chunk_keys(root, list(range(blocks * block)))
    saved_blocks = np.random.default_rng(2).permutation(blocks).tolist()

    def worker(kv: dict[str, torch.Tensor], direct: bool | None = None) -> WorkerSide:
        w = WorkerSide(StoreLink(lambda first: client, retry_after_s=0.0), tuple(names), lay, block,
                       direct_loads=direct)
        w.register(kv, "FLASH_ATTN", blocks)
        return w

    saver = worker(src)
    save_s = run_steps(saver, StepPlan(saves=[SaveSpec("s", keys, saved_blocks, [0] * blocks, root, 0)]))
    load_plan = StepPlan(loads=[LoadSpec("l", keys, list(range(blocks)), [0] * blocks, None)])
    index = torch.tensor(saved_blocks, device=args.device)
    nbytes = blocks * lay.chunk_bytes(block)
    row: dict[str, Any] = {"order": name, "layers": lay.num_layers, "blocks": blocks, "bytes": nbytes,
                           "saved_chunks": saver.stats.saved_chunks, "save_s": save_s}
    # the default (direct loads out of the page-locked pool where they run) and, for the measured
    # order, the staged path beside it (the pool copied into a pinned arena first)
    direct_mode = {"auto": None, "on": True, "off": False}[args.direct]
    for mode, direct in [("", direct_mode)] + ([("staged_", False)] if measured else []):
        dst = dict(zip(names, kv_views(lay, blocks, block, ORDERS[name], args.device), strict=True))
        loader = worker(dst, direct)
        loads = [run_steps(loader, load_plan) for _ in range(repeats + 1)][1:]  # the first pins the arena
        failed = loader.take_failed_blocks()
        exact = all(torch.equal(dst[n].view(torch.uint8), src[n].index_select(0, index).view(torch.uint8))
                    for n in names)
        load_s = statistics.median(loads)
        row.update({f"{mode}byte_exact": exact, f"{mode}failed_blocks": len(failed),
                    f"{mode}direct_chunks": loader.stats.direct_chunks,  # over the warm-up and the repeats
                    f"{mode}load_s": load_s, f"{mode}loads_s": loads, f"{mode}load_gbps": nbytes / load_s / 1e9})
        del dst
    if name == "LBNHC":
        row["pool"] = pool_check(client, args.device)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--other-layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--orders", default=",".join(ORDERS), help="comma-separated KVCacheLayout orders (first: measured)")
    ap.add_argument("--direct", choices=["auto", "on", "off"], default="auto",
                    help="the worker's direct_loads (auto: where the pool is page-locked on CUDA; on: also a CPU dry run)")
    ap.add_argument("--client", choices=["inprocess", "service"], default="inprocess",
                    help="the store the worker loads from: in this process, or a `kvtier serve` (vLLM's case)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    setup: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "client": args.client}
    probe = host_to_device_probe(args.device, 1 << 30)
    if probe is not None:
        setup["h2d_pinned_gbps"] = probe[0] / probe[1] / 1e9
        setup["gpu"] = torch.cuda.get_device_name(0)
    rows = []
    for i, name in enumerate(args.orders.split(",")):
        layers = args.layers if i == 0 else args.other_layers
        lay = KVLayout(num_layers=layers, num_kv_heads=args.heads, head_size=args.head_size, dtype=args.dtype)
        row = check_order(name, lay, args, args.repeats if i == 0 else 1, measured=i == 0)
        if "h2d_pinned_gbps" in setup:
            row["load_vs_pinned"] = row["load_gbps"] / setup["h2d_pinned_gbps"]
            if "staged_load_gbps" in row:
                row["staged_load_vs_pinned"] = row["staged_load_gbps"] / setup["h2d_pinned_gbps"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"setup": setup, "cases": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = all(r["byte_exact"] and not r["failed_blocks"] and r["saved_chunks"] == r["blocks"]
             and r.get("staged_byte_exact", True) and not r.get("staged_failed_blocks") for r in rows)
    print("all byte-exact" if ok else "NOT byte-exact or incomplete", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
