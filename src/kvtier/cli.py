"""The `kvtier` command: demo, store service, benchmarks, store inspection."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from kvtier.core.errors import ConfigError, KVTierError

# Optional dependencies a subcommand may import, and the extra that installs each.
_EXTRA_OF_MODULE = {"torch": "torch", "transformers": "transformers", "vllm": "vllm", "matplotlib": "bench",
                    "redis": "redis", "aiohttp": "proxy", "yarl": "proxy"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`kvtier demo: error: argument --turns: ...`), exit 2.

    Subparsers are built with the parent's class, so every subcommand reports the same way.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Argument types: a bad value becomes argparse's "argument --x: ..." error, before any work starts.
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _load_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 1 (1 keeps the loads even), got {text!r}")
    return value


def readable_file(text: str) -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text!r}")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: permission denied")
    return text


def trace_spec(text: str) -> str:
    """A trace file to read, or synthetic:NAME (a generated trace; its name is checked when it is built)."""
    return text if text.startswith("synthetic:") else readable_file(text)


def existing_folder(text: str) -> str:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    return text


def folder_to_create(text: str) -> str:
    """A folder that exists or can be made: nothing on the way to it may be a file."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise argparse.ArgumentTypeError(f"{str(part)!r} is a file, not a folder")
            break
    return text


def _prepare_output(option: str, value: str) -> None:
    """Make the folder of an output file now, so a bad path fails before a long run, not after."""
    path = Path(value)
    if path.is_dir():
        raise KVTierError(f"argument {option}: {value!r} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KVTierError(f"argument {option}: cannot create the folder of {value!r}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise KVTierError(f"argument {option}: cannot write {value!r}: permission denied")


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


def _trace_path(trace: str | None) -> str:
    """--trace as given, or the Mooncake trace beside the checkout, wherever the command runs from."""
    from kvtier.bench.trace import DEFAULT_TRACE

    if trace is not None:
        return trace
    if not DEFAULT_TRACE.is_file():
        raise KVTierError(f"argument --trace: the default trace {str(DEFAULT_TRACE)!r} is missing; pass --trace")
    return str(DEFAULT_TRACE)


def _cmd_bench_trace(args: argparse.Namespace) -> int:
    from kvtier.bench.trace import run_trace_bench, run_trace_suite
    from kvtier.bench.traces import SYNTHETIC_TRACES

    json_out = Path(args.json or ("results/bench_trace_suite.json" if args.suite else "results/bench_trace.json"))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    trace = _trace_path(args.trace)
    if args.suite:
        traces = [f"synthetic:{name}" for name in SYNTHETIC_TRACES] + [trace]
        run_trace_suite(list(dict.fromkeys(traces)), json_out, seed=args.seed)
        return 0
    run_trace_bench(trace, json_out, png_out=args.png, max_requests=args.max_requests, seed=args.seed)
    return 0


def _cmd_bench_fleet(args: argparse.Namespace) -> int:
    from kvtier.bench.fleet import run_fleet_bench

    run_fleet_bench(_trace_path(args.trace), args.json, png_out=args.png or None, hosts=args.hosts,
                    max_requests=args.max_requests, real_payload=args.real_payload, vllm_runs=not args.no_vllm,
                    vllm_quick=args.vllm_quick, vllm_repeats=args.vllm_repeats, engine_runs=args.vllm_runs)
    return 0


def _host_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--hosts must be a comma-separated list of positive counts, got {text!r}")
    return counts


def _engine_runs(text: str) -> tuple[str, ...]:
    known = ("pd", "routing")
    runs = tuple(part.strip() for part in text.split(",") if part.strip())
    if not runs or any(r not in known for r in runs):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(known)}, got {text!r}")
    return runs


def _cmd_bench_service(args: argparse.Namespace) -> int:
    from kvtier.bench.service import exit_status, run_service_bench

    sizes = {"chunks": args.chunks} if args.chunks is not None else {}  # else the bench's default
    if args.metrics_overhead:
        from kvtier.bench.metrics_overhead import run_metrics_overhead

        result = run_metrics_overhead(args.json or "results/bench_service_metrics.json", rounds=args.rounds,
                                      **sizes)
        return 0 if result["verified"] else 1
    return exit_status(run_service_bench(args.json or "results/bench_service.json",
                                         metrics=args.metrics == "on", **sizes))


def _cmd_bench_ttft(args: argparse.Namespace) -> int:
    from kvtier.bench.ttft import run_ttft_bench

    run_ttft_bench(args.json, png_out=args.png, quick=args.quick, device=args.device, shape=args.shape,
                   dtype=args.dtype, lengths=args.lengths, throttle_disk_gbps=args.throttle_disk_gbps,
                   repeats=args.repeats)
    return 0


def _cmd_bench_sparse(args: argparse.Namespace) -> int:
    from kvtier.bench.sparse import run_sparse_bench

    run_sparse_bench(args.json, png_out=args.png, quick=args.quick, device=args.device, shape=args.shape,
                     dtype=args.dtype, prefetch_blocks=args.prefetch_blocks)
    return 0


def _cmd_bench_vllm(args: argparse.Namespace) -> int:
    from kvtier.bench.vllm import run_vllm_bench

    result = run_vllm_bench(args.json, quick=args.quick, workload=args.workload)
    wrong = result["details"]["first_token_mismatch_runs"]
    if wrong:  # a run that served another first token than vLLM alone: the timings do not count
        print(f"kvtier bench vllm: first-token mismatches in {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvtier.bench.demo import run_demo

    run_demo(model_path=args.model, cache_dir=args.cache_dir, turns=args.turns, conversations=args.conversations,
             repeats=args.repeats, doc_tokens=args.doc_tokens, quick=args.quick, json_out=args.json, png_out=args.png)
    return 0


def _proxy_mode(args: argparse.Namespace) -> str:
    """"routing" (--instance) or "pd" (--prefill and --decode); argparse's error for a mix or neither."""
    parser: argparse.ArgumentParser = args.proxy_parser
    routing = [name for name, value in (("--instance", args.instance), ("--block-size", args.block_size),
                                        ("--max-load-share", args.max_load_share)) if value is not None]
    pd = [name for name, value in (("--prefill", args.prefill), ("--decode", args.decode),
                                   ("--prefill-timeout", args.prefill_timeout)) if value is not None]
    if routing and pd:
        parser.error(f"{', '.join(pd)} (prefill/decode) and {', '.join(routing)} (cache-aware routing) are two "
                     "modes; give one")
    if routing:
        if args.instance is None:
            parser.error(f"{', '.join(routing)} needs --instance URL=EVENTS[=REPLAY] (once per vLLM instance)")
        return "routing"
    if args.prefill is None or args.decode is None:
        missing = " and ".join(n for n, v in (("--prefill", args.prefill), ("--decode", args.decode)) if v is None)
        hint = "" if pd else " for prefill/decode, or --instance URL=EVENTS[=REPLAY] for cache-aware routing"
        parser.error(f"{missing} {'is' if ' and ' not in missing else 'are'} required{hint}")
    return "pd"


def _cmd_proxy(args: argparse.Namespace) -> int:
    import logging

    mode = _proxy_mode(args)
    fmt = "%(levelname)s %(asctime)s %(message)s"
    if mode == "routing":
        from kvtier.proxy.routing import RoutingConfig, parse_instance, run_routing_proxy

        given = {"block_size": args.block_size, "max_load_share": args.max_load_share}
        rcfg = RoutingConfig(tuple(parse_instance(v) for v in args.instance), connect_timeout_s=args.connect_timeout,
                             read_timeout_s=args.read_timeout, **{k: v for k, v in given.items() if v is not None})
        logging.basicConfig(level=logging.INFO, format=fmt)
        _listening(run_routing_proxy, rcfg, args.host, args.port)
        return 0

    from kvtier.proxy import ProxyConfig, run_proxy

    timeout = {} if args.prefill_timeout is None else {"prefill_timeout_s": args.prefill_timeout}
    cfg = ProxyConfig(args.prefill, args.decode, connect_timeout_s=args.connect_timeout,
                      read_timeout_s=args.read_timeout, **timeout)
    logging.basicConfig(level=logging.INFO, format=fmt)
    _listening(run_proxy, cfg, args.host, args.port)
    return 0


def _listening(run: Any, cfg: Any, host: str, port: int) -> None:
    """Run a proxy; an address it cannot resolve or bind is a one-line error, not a traceback."""
    try:
        run(cfg, host, port)
    except OSError as e:  # socket.gaierror for a host that does not resolve, EADDRINUSE, EACCES, ...
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvtier.service.server import serve_main

    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvtier", description="KV-cache memory manager for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="chats over a long shared document with and without kvtier; TTFT per turn")
    demo.add_argument("--model", default=None, type=existing_folder,
                      help="a local transformers causal LM (default: a small random-weight Llama)")
    demo.add_argument("--cache-dir", default=None, type=folder_to_create,
                      help="disk tier folder (default: ~/.cache/kvtier/demo)")
    # None: the default, which --quick lowers; a value given wins over --quick
    demo.add_argument("--turns", type=positive_int, default=None, help="turns per chat (default 3; 2 with --quick)")
    demo.add_argument("--conversations", type=positive_int, default=None, help="chats (default 2)")
    demo.add_argument("--repeats", type=positive_int, default=None,
                      help="timed runs per side and row, medians (default 3; 1 with --quick)")
    demo.add_argument("--doc-tokens", type=positive_int, default=None,
                      help="length of the shared document, at least 16 (default 3072; 256 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a seconds-long run on a tiny model (for tests); sizes given explicitly still apply")
    demo.add_argument("--json", default="results/demo.json")
    demo.add_argument("--png", default="results/demo.png")
    demo.set_defaults(fn=_cmd_demo)

    serve = sub.add_parser("serve", help="run the per-host store service", add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(fn=_cmd_serve)

    proxy = sub.add_parser("proxy", help="OpenAI-compatible proxy: prefill/decode disaggregation over two vLLM "
                                         "instances, or cache-aware routing over several",
                           description="Two modes: --prefill URL --decode URL (prefill on one instance, decode on "
                                       "the other, KV handed over through the store), or --instance URL=EVENTS "
                                       "[--instance ...] (each request to the instance that caches its prefix, "
                                       "learned from the instances' KV events).")
    proxy.add_argument("--host", default="127.0.0.1", help="address to listen on")
    proxy.add_argument("--port", type=port_number, default=8000)
    proxy.add_argument("--connect-timeout", type=positive_float, default=5.0,
                       help="seconds to wait for an instance to accept a connection")
    proxy.add_argument("--read-timeout", type=positive_float, default=600.0,
                       help="seconds to wait between two pieces of an instance's answer")
    pdg = proxy.add_argument_group("prefill/decode disaggregation")
    pdg.add_argument("--prefill", help="the prefill instance (kv_role kv_producer), http://host:port")
    pdg.add_argument("--decode", help="the decode instance (kv_role kv_consumer), http://host:port")
    pdg.add_argument("--prefill-timeout", type=positive_float, default=None,
                     help="seconds the whole prefill call may take; past it the decode instance computes the prompt "
                          "(default 120)")
    rtg = proxy.add_argument_group("cache-aware routing")
    rtg.add_argument("--instance", action="append", default=None, metavar="URL=EVENTS[=REPLAY]",
                     help="a vLLM instance, the ZMQ endpoint of its KV events (its --kv-events-config) and of their "
                          "replay socket if any; once per instance")
    rtg.add_argument("--block-size", type=positive_int, default=None,
                     help="the instances' --block-size, which their events carry (default 16)")
    rtg.add_argument("--max-load-share", type=_load_share, default=None,
                     help="each instance gets at most this times its fair share of requests (default 1.5)")
    proxy.set_defaults(fn=_cmd_proxy, proxy_parser=proxy)

    store = sub.add_parser("store", help="inspect or clear a disk tier folder")
    ssub = store.add_subparsers(dest="store_command", required=True)
    st = ssub.add_parser("stats", help="chunks, bytes and corrupt files under a disk tier root")
    st.add_argument("--root", required=True)  # the tier reports a missing or foreign folder itself
    st.set_defaults(fn=_cmd_store_stats)
    cl = ssub.add_parser("clear", help="remove every chunk under a disk tier root")
    cl.add_argument("--root", required=True)
    cl.set_defaults(fn=_cmd_store_clear)

    bench = sub.add_parser("bench", help="benchmarks (side by side with a baseline; JSON out)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bt = bsub.add_parser("tiers", help="DRAM and disk tier reads vs memcpy / raw reads; key hashing")
    bt.add_argument("--json", default="results/bench_tiers.json")
    bt.add_argument("--root", default=None, type=folder_to_create,
                    help="folder for the disk measurement (default: a temp dir under ./results)")
    bt.add_argument("--gib", type=positive_float, default=1.0, help="GiB moved per measurement")
    bt.add_argument("--runs", type=positive_int, default=5)
    bt.set_defaults(fn=_cmd_bench_tiers)
    btr = bsub.add_parser("trace", help="eviction policies replayed on a Mooncake-format trace vs Belady")
    btr.add_argument("--trace", default=None, type=trace_spec,
                     help="a Mooncake-format jsonl file (default: shared/traces/mooncake/conversation_trace.jsonl "
                          "beside the checkout), or synthetic:NAME for a generated trace "
                          "(zipf, zipf_drift, scan, loop, conversation, system_prompt, shift)")
    btr.add_argument("--json", default=None,
                     help="default results/bench_trace.json (results/bench_trace_suite.json with --suite)")
    btr.add_argument("--png", default="results/bench_trace.png")
    btr.add_argument("--max-requests", type=positive_int, default=None,
                     help="replay only the first N requests (for synthetic:NAME, generate N; default 12000)")
    btr.add_argument("--seed", type=int, default=0, help="seed of synthetic:NAME traces")
    btr.add_argument("--suite", action="store_true",
                     help="LRU vs the default policy on every generated trace and --trace: ratio per capacity")
    btr.set_defaults(fn=_cmd_bench_trace)
    bfl = bsub.add_parser("fleet", help="one cache for many hosts: private DRAM vs a Redis or shared-folder tier")
    bfl.add_argument("--trace", default=None, type=trace_spec,
                     help="a Mooncake-format jsonl trace (default: the conversation trace beside the checkout), "
                          "or synthetic:NAME for a generated trace (kvtier.bench.traces)")
    bfl.add_argument("--json", default="results/bench_fleet.json")
    bfl.add_argument("--png", default="results/bench_fleet.png", help="hit ratio against hosts ('' for none)")
    bfl.add_argument("--hosts", type=_host_counts, default=(1, 2, 4, 8, 16, 32, 64), help="e.g. 1,2,4,8")
    bfl.add_argument("--max-requests", type=positive_int, default=None)
    bfl.add_argument("--real-payload", action="store_true",
                     help="also move real chunks between two `kvtier serve` processes over one shared folder")
    bfl.add_argument("--no-vllm", action="store_true",
                     help="skip the vLLM engine runs (vllm_shared and pd: five engines at once; routing: two; minutes)")
    bfl.add_argument("--vllm-quick", action="store_true", help="the engine runs on a tiny model and workload")
    bfl.add_argument("--vllm-runs", type=_engine_runs, default=("pd", "routing"),
                     help="which engine runs: pd (vllm_shared and pd, five servers), routing (two servers behind "
                          "the routing proxy against round robin); comma-separated (default: pd,routing)")
    bfl.add_argument("--vllm-repeats", type=positive_int, default=3,
                     help="passes of the engine runs' workload on fresh documents (ratios: their medians)")
    bfl.set_defaults(fn=_cmd_bench_fleet)
    bsv = bsub.add_parser("service", help="store service lookup rate and shared-memory load throughput")
    bsv.add_argument("--json", default=None,
                     help="results/bench_service.json (with --metrics-overhead: results/bench_service_metrics.json)")
    bsv.add_argument("--chunks", type=positive_int, default=None, help="chunks in the chain loaded and looked up (720)")
    bsv.add_argument("--metrics", choices=("on", "off"), default="on",
                     help="off: the service records no metrics (to measure what they cost)")
    bsv.add_argument("--metrics-overhead", action="store_true",
                     help="lookups and loads of a service with metrics on and one with them off, interleaved, "
                          "5 runs each: the on/off ratio of the medians")
    bsv.add_argument("--rounds", type=positive_int, default=1,
                     help="with --metrics-overhead: repeat the whole comparison (fresh services) this many times")
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
    btt.add_argument("--repeats", type=positive_int, default=None, help="runs per column, medians reported (default 3; 5 quick)")
    btt.set_defaults(fn=_cmd_bench_ttft)
    bsp = bsub.add_parser("sparse", help="sparse attention: retrieval accuracy, fidelity, decode speed")
    bsp.add_argument("--json", default="results/bench_sparse.json")
    bsp.add_argument("--png", default="results/bench_sparse.png")
    bsp.add_argument("--quick", action="store_true")
    bsp.add_argument("--device", default=None, choices=["cpu", "cuda"],
                     help="run a random Llama decoding on this device (gpu_decode, prefill, max_context, batched) "
                          "instead of the CPU rows")
    bsp.add_argument("--shape", default=None, choices=["tiny", "llama-1b", "llama-8b"],
                     help="random Llama shape for --device (tiny on cpu, llama-8b on cuda by default)")
    bsp.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="model dtype for --device (float32 on cpu, bfloat16 on cuda by default)")
    bsp.add_argument("--prefetch-blocks", type=int, default=None,
                     help="decode prefetch for --device: runners-up read ahead per layer and KV head "
                          "(SparseConfig.prefetch_blocks; default 4 on cuda, 0 on cpu)")
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
    # The one place user-input errors become a message: KVTierError (ConfigError, a bad trace, a missing
    # or foreign folder) is one line and exit code 2, as argparse does for a bad argument.
    try:
        for attr in ("json", "png"):
            value = getattr(args, attr, None)
            if value:
                _prepare_output(f"--{attr}", value)
        return int(args.fn(args) or 0)
    except KVTierError as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF_MODULE.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"kvtier: error: this command needs {e.name}: pip install 'kvtier[{extra}]'", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
