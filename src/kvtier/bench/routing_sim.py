"""The cache-aware router on more than one trace: `kvtier bench fleet`'s `cache_aware` column
(kvtier.bench.fleet.simulate_cache_aware, the router's real code fed by the hosts' KV events) on the
Mooncake conversation trace and on every generated trace of kvtier.bench.traces, so that a routing
rule is not tuned to one trace.

    python -m kvtier.bench.routing_sim [--hosts 4] [--requests 12000] [--json results/routing_sim.json]

Per trace, at H hosts each with 1% of the trace's distinct chunks in DRAM: `private` (round robin),
`cache_aware` and `max_load_share`, against `one_host` (one host with H% DRAM, every request),
and the target of issue 21 (cache_aware >= 0.9x one_host, max_load_share <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtier.bench.fleet import simulate_cache_aware, simulate_fleet
from kvtier.bench.trace import DEFAULT_TRACE, distinct_chunks, load_requests
from kvtier.bench.traces import SYNTHETIC_TRACES

ALL_TRACES = ("mooncake", *SYNTHETIC_TRACES)


def routing_row(name: str, hosts: int = 4, requests: int = 12000, seed: int = 0,
                capacity_pct: float = 1.0) -> dict[str, Any]:
    started = time.perf_counter()
    reqs = load_requests(DEFAULT_TRACE if name == "mooncake" else f"synthetic:{name}",
                         None if name == "mooncake" else requests, seed)
    distinct = distinct_chunks(reqs)
    dram = max(1, round(distinct * capacity_pct / 100))
    one = simulate_fleet(reqs, 1, max(1, round(distinct * hosts * capacity_pct / 100))).block_ratio()
    private = simulate_fleet(reqs, hosts, dram).block_ratio()
    routed, share = simulate_cache_aware(reqs, hosts, dram)
    ca = routed.block_ratio()
    return {"trace": name, "requests": len(reqs), "hosts": hosts, "one_host": one, "private": private,
            "cache_aware": ca, "max_load_share": share,
            "private_vs_one_host": private / one if one else None,
            "cache_aware_vs_one_host": ca / one if one else None,
            "met": bool(one) and ca / one >= 0.9 and share <= 1.5,
            "seconds": time.perf_counter() - started}


def run_routing_suite(traces: Sequence[str] = ALL_TRACES, hosts: int = 4, requests: int = 12000,
                      json_out: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    unknown = [t for t in traces if t not in ALL_TRACES]
    if unknown:
        raise ValueError(f"unknown traces {unknown}; known: {', '.join(ALL_TRACES)}")
    rows = []
    for name in traces:
        rows.append(routing_row(name, hosts, requests))
        r = rows[-1]
        if not quiet:
            print(f"{name:14s} one_host {r['one_host']:.4f}  private {r['private']:.4f} ({r['private_vs_one_host']:.3f}x)  "
                  f"cache_aware {r['cache_aware']:.4f} ({r['cache_aware_vs_one_host']:.3f}x)  "
                  f"max load share {r['max_load_share']:.3f}", file=sys.stderr, flush=True)
    result = {"hosts": hosts, "capacity_pct": 1.0, "rows": rows, "target": ">= 0.9x one_host, max_load_share <= 1.5"}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.routing_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=",".join(ALL_TRACES), help="comma-separated: " + ", ".join(ALL_TRACES))
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--requests", type=int, default=12000, help="requests of each generated trace")
    ap.add_argument("--json", default="results/routing_sim.json")
    args = ap.parse_args(argv)
    if args.hosts < 1 or args.requests < 1:
        ap.error("--hosts and --requests must be >= 1")
    try:
        run_routing_suite([t for t in args.traces.split(",") if t], args.hosts, args.requests, args.json or None)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
