"""`kvtier bench service --metrics-overhead`: what recording metrics costs the service's
lookups and loads (issue 20: within 5%).

Two `python -m kvtier.service` children run side by side with the same config, one with
metrics on (recorded, and served on a port as an operator runs it) and one with `metrics:
false` (a NullMetrics store: nothing recorded). This process is a client of both, with the
same chain of chunks saved into each. Each of `runs` runs measures, for both services:
- lookups: chunks looked up per second through batched lookup messages (every key a hit),
  over `slices` time slices taken alternately from the two services;
- loads: one pass loading every chunk (ServiceClient.load, `load_batch` chunks per call),
  alternating batches between the two services, each into its own destination, verified
  after the pass (zeroed before it).
Which service goes first alternates from run to run (and which is started first, from round to
round). Interleaving this finely is what makes
the comparison fair on a shared machine: load from other processes falls on both services
alike. Reported: the median of the runs per service and the ratio on/off of the medians (1.0:
metrics cost nothing; the target is >= 0.95). `rounds` repeats the whole comparison with fresh
service processes; the ratios' median over rounds is reported too. Nothing asserts a time.

Two steadier views of the same cost go in the JSON beside it: the median time of one lookup
message and of one load call per service over all runs (a preemption by another process spoils
a few calls, not the median), and the service process's own CPU seconds per chunk looked up and
loaded (from /proc/<pid>/stat; a process that waits for a core is not charged for the wait).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.service import (
    CHUNK_TOKENS,
    LAYOUT,
    _wait_for_socket,
    save_chain,
    start_service,
    stop_service,
    verify_chain,
)
from kvtier.client import connect
from kvtier.core.layout import KVLayout

MODES = ("on", "off")
TARGET_RATIO = 0.95


def _lookup_slice(client: Any, keys: list[bytes], batch: int, seconds: float,
                  calls: list[float] | None = None) -> tuple[int, float]:
    """(chunks found, seconds taken) looking up the whole chain, `batch` keys per message,
    for at least `seconds`; each message's seconds are appended to `calls`."""
    n = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for s in range(0, len(keys), batch):
            c0 = time.perf_counter()
            n += client.lookup(keys[s:s + batch]).hits
            if calls is not None:
                calls.append(time.perf_counter() - c0)
    return n, elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load_batch(client: Any, keys: list[bytes], dest: np.ndarray, start: int, batch: int) -> float:
    part = keys[start:start + batch]
    layers = dest.shape[1]
    dests = [[dest[start + i, layer] for layer in range(layers)] for i in range(len(part))]
    t0 = time.perf_counter()
    res = client.load(part, dests).wait()
    took = time.perf_counter() - t0
    if res.failed:
        raise RuntimeError(f"load failed for chunks {res.failed[:5]}")
    return took


def _one_round(chunks: int, runs: int, load_batch: int, lookup_batch: int, lookup_seconds: float,
               slices: int, layout: KVLayout, chunk_tokens: int, started: tuple[str, ...]) -> dict[str, Any]:
    """One comparison; `started` is the order the services are started, filled and given their
    destination arrays in (alternated by round, so that memory placement favours neither)."""
    lb = layout.layer_bytes(chunk_tokens)
    total = chunks * layout.chunk_bytes(chunk_tokens)
    base = np.random.default_rng(0).integers(0, 256, (layout.num_layers, lb), dtype=np.uint8)
    folders = {mode: tempfile.mkdtemp(prefix=f"kvtier-bench-metrics-{mode}-", dir="/tmp") for mode in MODES}
    procs: dict[str, Any] = {}
    clients: dict[str, Any] = {}
    try:
        for mode in started:
            sock, procs[mode] = start_service(folders[mode], layout, chunk_tokens, total, mode == "on")
            _wait_for_socket(sock, procs[mode])
            clients[mode] = connect({"mode": "service", "socket_path": sock}, layout=layout)
        root = clients["on"].namespace("bench-service").root()
        keys = clients["on"].chunk_keys(root, list(range(chunks * chunk_tokens)))
        for mode in started:
            save_chain(clients[mode], root, keys, base)
        dests = {mode: np.zeros((chunks, layout.num_layers, lb), dtype=np.uint8) for mode in started}
        for mode in MODES:  # warm-up: one lookup slice and one pass each, not timed
            _lookup_slice(clients[mode], keys, lookup_batch, 0.05)
            for s in range(0, chunks, load_batch):
                _load_batch(clients[mode], keys, dests[mode], s, load_batch)

        lookup_rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        load_rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        verified: dict[str, list[bool]] = {mode: [] for mode in MODES}
        lookup_calls: dict[str, list[float]] = {mode: [] for mode in MODES}
        load_calls: dict[str, list[float]] = {mode: [] for mode in MODES}
        lookup_cpu = dict.fromkeys(MODES, 0.0)
        load_cpu = dict.fromkeys(MODES, 0.0)
        looked_up = dict.fromkeys(MODES, 0)
        for r in range(runs):
            order = MODES if r % 2 == 0 else MODES[::-1]
            found = dict.fromkeys(MODES, 0)
            spent = dict.fromkeys(MODES, 0.0)
            for j in range(slices):
                for mode in order if j % 2 == 0 else order[::-1]:
                    cpu0 = _cpu_seconds(procs[mode].pid)
                    n, took_s = _lookup_slice(clients[mode], keys, lookup_batch, lookup_seconds / slices,
                                              lookup_calls[mode])
                    lookup_cpu[mode] += _cpu_seconds(procs[mode].pid) - cpu0
                    found[mode] += n
                    spent[mode] += took_s
            load_s = dict.fromkeys(MODES, 0.0)
            for mode in MODES:
                dests[mode].fill(0)
            for b, s in enumerate(range(0, chunks, load_batch)):
                for mode in order if b % 2 == 0 else order[::-1]:
                    cpu0 = _cpu_seconds(procs[mode].pid)
                    took = _load_batch(clients[mode], keys, dests[mode], s, load_batch)
                    load_cpu[mode] += _cpu_seconds(procs[mode].pid) - cpu0
                    load_s[mode] += took
                    load_calls[mode].append(took)
            for mode in MODES:
                looked_up[mode] += found[mode]
                lookup_rates[mode].append(found[mode] / spent[mode])
                load_rates[mode].append(total / load_s[mode])
                verified[mode].append(verify_chain(dests[mode], base, chunks))
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            stop_service(proc)
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)

    lookup_median = {mode: statistics.median(lookup_rates[mode]) for mode in MODES}
    load_median = {mode: statistics.median(load_rates[mode]) for mode in MODES}
    lookup_call = {mode: statistics.median(lookup_calls[mode]) for mode in MODES}
    load_call = {mode: statistics.median(load_calls[mode]) for mode in MODES}
    loaded = runs * chunks
    return {
        "lookup_chunks_per_s": {"runs": lookup_rates, "median": lookup_median},
        "load_bytes_per_s": {"runs": load_rates, "median": load_median},
        "lookup_ratio": lookup_median["on"] / lookup_median["off"],
        "load_ratio": load_median["on"] / load_median["off"],
        # steadier views (speed ratios on/off, like the two above: 1.0 = metrics cost nothing)
        "lookup_call_median_s": lookup_call,
        "load_call_median_s": load_call,
        "lookup_call_ratio": lookup_call["off"] / lookup_call["on"],
        "load_call_ratio": load_call["off"] / load_call["on"],
        "service_cpu_us_per_chunk": {
            "lookup": {mode: 1e6 * lookup_cpu[mode] / max(looked_up[mode], 1) for mode in MODES},
            "load": {mode: 1e6 * load_cpu[mode] / loaded for mode in MODES},
        },
        "verified_runs": verified,
    }


def run_metrics_overhead(json_out: str | os.PathLike[str] | None = None, *, chunks: int = 720, runs: int = 5,
                         rounds: int = 1, load_batch: int = 120, lookup_batch: int = 720,
                         lookup_seconds: float = 1.0, slices: int = 10, layout: KVLayout = LAYOUT,
                         chunk_tokens: int = CHUNK_TOKENS) -> dict[str, Any]:
    if min(chunks, runs, rounds, load_batch, lookup_batch, slices) < 1 or not lookup_seconds > 0:
        raise ValueError("chunks, runs, rounds, load_batch, lookup_batch and slices must be >= 1, "
                         f"lookup_seconds > 0 (got {chunks}, {runs}, {rounds}, {load_batch}, {lookup_batch}, "
                         f"{slices}, {lookup_seconds})")
    results = [_one_round(chunks, runs, load_batch, lookup_batch, lookup_seconds, slices, layout, chunk_tokens,
                          MODES if i % 2 == 0 else MODES[::-1]) for i in range(rounds)]
    lookup_ratios = [r["lookup_ratio"] for r in results]
    load_ratios = [r["load_ratio"] for r in results]
    lookup_call_ratios = [r["lookup_call_ratio"] for r in results]
    load_call_ratios = [r["load_call_ratio"] for r in results]
    verified = all(ok for r in results for oks in r["verified_runs"].values() for ok in oks)
    result: dict[str, Any] = {
        "lookup_ratio": statistics.median(lookup_ratios),
        "load_ratio": statistics.median(load_ratios),
        "lookup_ratios": lookup_ratios,
        "load_ratios": load_ratios,
        "lookup_call_ratio": statistics.median(lookup_call_ratios),
        "load_call_ratio": statistics.median(load_call_ratios),
        "target_ratio": TARGET_RATIO,
        "within_target": statistics.median(lookup_ratios) >= TARGET_RATIO
        and statistics.median(load_ratios) >= TARGET_RATIO,
        "verified": verified,
        "rounds": results,
        "chunks": chunks,
        "chunk_bytes": layout.chunk_bytes(chunk_tokens),
        "runs": runs,
        "load_batch": load_batch,
        "lookup_batch": lookup_batch,
        "lookup_seconds": lookup_seconds,
        "slices": slices,
    }
    print(f"kvtier service metrics overhead: {chunks} chunks of {result['chunk_bytes'] / 2**20:.2f} MiB, "
          f"metrics on and off interleaved, {runs} runs each, {rounds} round(s); contents verified: {verified}")
    print(f"  {'round':<6} {'lookups/s on':>14} {'off':>14} {'ratio':>7}   {'load GB/s on':>13} {'off':>7} {'ratio':>7}")
    for i, r in enumerate(results):
        lk, ld = r["lookup_chunks_per_s"]["median"], r["load_bytes_per_s"]["median"]
        print(f"  {i:<6} {lk['on']:>14,.0f} {lk['off']:>14,.0f} {r['lookup_ratio']:>7.3f}   "
              f"{ld['on'] / 1e9:>13.2f} {ld['off'] / 1e9:>7.2f} {r['load_ratio']:>7.3f}")
    print(f"  on/off ratio of medians (median over rounds): lookups {result['lookup_ratio']:.3f}, "
          f"loads {result['load_ratio']:.3f}  (target >= {TARGET_RATIO})")
    print(f"  the same from the median call (off time / on time): lookups {result['lookup_call_ratio']:.3f}, "
          f"loads {result['load_call_ratio']:.3f}")
    for i, r in enumerate(results):
        cpu = r["service_cpu_us_per_chunk"]
        print(f"  round {i}: service CPU per chunk, lookups {cpu['lookup']['on']:.2f} us on / "
              f"{cpu['lookup']['off']:.2f} off; loads {cpu['load']['on']:.2f} us on / {cpu['load']['off']:.2f} off")
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier bench service --metrics-overhead")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--chunks", type=int, default=720)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    result = run_metrics_overhead(args.json_out, chunks=args.chunks, runs=args.runs, rounds=args.rounds)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
