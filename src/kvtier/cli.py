"""The `kvtier` command: demo, store service, benchmarks, store inspection."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvtier.core.errors import KVTierError

DEFAULT_TRACE = "../shared/traces/mooncake/conversation_trace.jsonl"


def _cmd_store_stats(args: argparse.Namespace) -> int:
    from kvtier.tiers.disk import scan_root

    print(json.dumps(scan_root(args.root), indent=2))
    return 0


def _cmd_store_clear(args: argparse.Namespace) -> int:
    from kvtier.tiers.disk import clear_root

    removed = clear_root(args.root)
    print(f"removed {removed['chunks']} chunks ({removed['bytes']} bytes) and {removed['temp_files']} temporary files "
          f"from {args.root}")
    return 0


def _cmd_bench_tiers(args: argparse.Namespace) -> int:
    from kvtier.bench.tiers import run_tiers_bench

    run_tiers_bench(json_out=args.json, root=args.root, gib=args.gib, runs=args.runs)
    return 0


def _cmd_bench_trace(args: argparse.Namespace) -> int:
    from kvtier.bench.trace import run_trace_bench

    run_trace_bench(args.trace, args.json, png_out=args.png, max_requests=args.max_requests)
    return 0


def _cmd_bench_service(args: argparse.Namespace) -> int:
    from kvtier.bench.service import run_service_bench

    run_service_bench(args.json)
    return 0


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from kvtier.bench.ttft import run_ttft_bench

    run_ttft_bench(args.json, png_out=args.png, quick=args.quick, device=args.device, shape=args.shape,
                   dtype=args.dtype, lengths=args.lengths, throttle_disk_gbps=args.throttle_disk_gbps,
                   repeats=args.repeats)
    return 0


def _cmd_bench_sparse(args: argparse.Namespace) -> int:
    from kvtier.bench.sparse import run_sparse_bench

    run_sparse_bench(args.json, png_out=args.png, quick=args.quick)
    return 0


def _cmd_bench_vllm(args: argparse.Namespace) -> int:
    from kvtier.bench.vllm import run_vllm_bench

    run_vllm_bench(args.json, quick=args.quick, workload=args.workload)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvtier.bench.demo import run_demo

    run_demo(model_path=args.model, cache_dir=args.cache_dir, turns=args.turns, conversations=args.conversations)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvtier.service.server import serve_main

    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier", description="KV-cache memory manager for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="multi-turn chat with and without kvtier; prints TTFT per turn")
    demo.add_argument("--model", default=None, help="a local transformers causal LM (default: a small random-weight Llama)")
    demo.add_argument("--cache-dir", default=None, help="disk tier folder (default: ~/.cache/kvtier/demo)")
    demo.add_argument("--turns", type=int, default=4)
    demo.add_argument("--conversations", type=int, default=3)
    demo.set_defaults(fn=_cmd_demo)

    serve = sub.add_parser("serve", help="run the per-host store service", add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(fn=_cmd_serve)

    store = sub.add_parser("store", help="inspect or clear a disk tier folder")
    ssub = store.add_subparsers(dest="store_command", required=True)
    st = ssub.add_parser("stats", help="chunks, bytes and corrupt files under a disk tier root")
    st.add_argument("--root", required=True)
    st.set_defaults(fn=_cmd_store_stats)
    cl = ssub.add_parser("clear", help="remove every chunk under a disk tier root")
    cl.add_argument("--root", required=True)
    cl.set_defaults(fn=_cmd_store_clear)

    bench = sub.add_parser("bench", help="benchmarks (side by side with a baseline; JSON out)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bt = bsub.add_parser("tiers", help="DRAM and disk tier reads vs memcpy / raw reads; key hashing")
    bt.add_argument("--json", default="results/bench_tiers.json")
    bt.add_argument("--root", default=None, help="folder for the disk measurement (default: a temp dir under ./results)")
    bt.add_argument("--gib", type=float, default=1.0, help="GiB moved per measurement")
    bt.add_argument("--runs", type=int, default=5)
    bt.set_defaults(fn=_cmd_bench_tiers)
    btr = bsub.add_parser("trace", help="eviction policies replayed on a Mooncake-format trace vs Belady")
    btr.add_argument("--trace", default=DEFAULT_TRACE)
    btr.add_argument("--json", default="results/bench_trace.json")
    btr.add_argument("--png", default="results/bench_trace.png")
    btr.add_argument("--max-requests", type=int, default=None)
    btr.set_defaults(fn=_cmd_bench_trace)
    bsv = bsub.add_parser("service", help="store service lookup rate and shared-memory load throughput")
    bsv.add_argument("--json", default="results/bench_service.json")
    bsv.set_defaults(fn=_cmd_bench_service)
    btt = bsub.add_parser("ttft", help="time to first token with transformers: no kvtier, miss, DRAM and disk hits")
    btt.add_argument("--json", default="results/bench_ttft.json")
    btt.add_argument("--png", default="results/bench_ttft.png")
    btt.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    btt.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model and its KV live")
    btt.add_argument("--shape", default=None, help="random Llama shape: llama-8b (default on cuda), llama-1b, tiny")
    btt.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    btt.add_argument("--lengths", default=None, type=lambda v: [int(x) for x in v.split(",")],
                     help="comma-separated prompt lengths (default 8192,32768 on cuda)")
    btt.add_argument("--throttle-disk-gbps", type=float, default=None,
                     help="testing aid: cap the disk tier's reads at this many GB/s (the floors use it)")
    btt.add_argument("--repeats", type=int, default=None, help="runs per column, medians reported (default 3; 5 quick)")
    btt.set_defaults(fn=_cmd_bench_ttft)
    bsp = bsub.add_parser("sparse", help="sparse attention: retrieval accuracy, fidelity, decode speed")
    bsp.add_argument("--json", default="results/bench_sparse.json")
    bsp.add_argument("--png", default="results/bench_sparse.png")
    bsp.add_argument("--quick", action="store_true")
    bsp.set_defaults(fn=_cmd_bench_sparse)
    bvl = bsub.add_parser("vllm", help="vLLM with and without kvtier: long-document QA and exact repeats (TTFT)")
    bvl.add_argument("--json", default="results/bench_vllm.json")
    bvl.add_argument("--quick", action="store_true", help="a tiny model and workload, for a smoke test")
    bvl.add_argument("--workload", choices=("all", "qa", "repeat"), default="all",
                     help="run both workloads, or only long-document QA (apc_*, kvtier_dram/disk) or exact repeats")
    bvl.set_defaults(fn=_cmd_bench_vllm)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the service parses its own options (argparse REMAINDER drops leading ones)
        from kvtier.service.server import serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    for attr in ("json", "png"):
        value = getattr(args, attr, None)
        if value:
            Path(value).parent.mkdir(parents=True, exist_ok=True)
    try:
        return int(args.fn(args) or 0)
    except KVTierError as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
