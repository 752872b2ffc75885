"""The fleet bench's `routing` row (issue 21): two vLLM servers behind `kvtier proxy --instance`,
cache-aware routing against round robin, with real payloads.

Two vLLM OpenAI servers (bench/vllm_servers.py), r0 and r1, each with kvtier (kv_both, its own
`kvtier serve` and DRAM pool: a host's private DRAM, no shared tier) and vLLM's --kv-events-config
publishing on an ipc ZMQ socket with a replay socket: vLLM's own blocks (medium GPU) and, through
the connector's take_events, the blocks it saved into kvtier (CPU). `kvtier proxy --instance`
subscribes to both and routes.

Workload: `bench vllm`'s long-document QA. D documents, Q questions on each, in rounds of one
question per document, documents in turn. D is odd: with an even D, round robin over two servers
would send every question on a document to the same server, an accident of the period. Both arms
get such a stream, each on its own documents (the same lengths, fresh random tokens: disjoint, so
neither arm can hit what the other computed), and their requests are interleaved one for one on
the same two servers (which arm goes first alternates), one request in flight at a time, so both
see the same servers under the same machine load:
  cache_aware   through the routing proxy
  round_robin   straight to the servers, r0, r1, r0, ...
vLLM's own KV memory holds ~1.5 prompts (as `bench vllm`'s apc_small), so reuse comes mostly from
kvtier's DRAM, which holds every document of both arms on each server (no evictions: what
differs between the arms is only whether a request finds its document on the server it is sent
to). TTFT is the server's own (vllm:time_to_first_token_seconds), read from whichever server
took the request. Two things keep taking turns on one machine out of the comparison (Pair and
run_stream say what was measured without them): each engine's OpenMP threads on a core of its
own, and a short unmeasured prompt to each server before each measured request.

Reported (`routing` in the fleet JSON): cache_aware_ttft_s and round_robin_ttft_s (means over the
rounds after each document's first visit, which is cold in both arms), ttft_ratio (cache_aware
over round_robin), first_visit_ttft_s, cached_fraction (prompt tokens the server did not compute:
vLLM's cached_tokens, its own prefix cache plus kvtier's loads), requests per server and
max_load_share per arm, and the proxy's /routing counters (events applied, blocks per medium).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.bench.vllm import QUICK, Sizes, _kvtier_config, _llm_kwargs, _stop_service, build_model
from kvtier.bench.vllm_servers import (
    Child,
    Server,
    cached_of,
    completion,
    free_port,
    post,
    routing_proxy_args,
    server_args,
    token_of,
)
from kvtier.core.config import default_cache_dir

NAMES = ("r0", "r1")
ARMS = ("cache_aware", "round_robin")


@dataclass(slots=True, frozen=True)
class Stream:
    docs: int = 3  # odd (see the module's docstring)
    questions: int = 4  # per document; the first is its cold first visit

    def __post_init__(self) -> None:
        if self.docs < 1 or self.docs % 2 == 0:
            raise ValueError(f"docs must be odd and positive (round robin over two servers), got {self.docs}")
        if self.questions < 2:
            raise ValueError(f"questions must be >= 2 (a first visit, then reuse), got {self.questions}")


def arm_stream(sizes: Sizes, stream: Stream, rng: random.Random) -> list[tuple[int, int, list[int]]]:
    """(round, document, prompt ids): `stream.questions` rounds over fresh documents, in turn."""
    def toks(n: int) -> list[int]:
        return [rng.randrange(3, sizes.vocab) for _ in range(n)]

    docs = [toks(sizes.doc_tokens) for _ in range(stream.docs)]
    return [(r, d, docs[d] + toks(sizes.question_tokens)) for r in range(stream.questions)
            for d in range(stream.docs)]


class Pair:
    """The two servers (kvtier + KV events) and the routing proxy of one run."""

    def __init__(self, sizes: Sizes, stream: Stream, model: Path, work: Path) -> None:
        self.sizes, self.stream, self.model, self.work = sizes, stream, str(model), work
        self.socks = {n: f"/tmp/kvtier-benchrt-{os.getpid()}-{n}.sock" for n in NAMES}
        self.events = {n: (f"ipc://{work}/{n}.events", f"ipc://{work}/{n}.replay") for n in NAMES}
        self.servers: dict[str, Server] = {}
        self.children: list[Child] = []
        # each engine's compute threads on a core of its own, as on its own host: vLLM's automatic
        # binding puts both on the same core, and then a request sent to one engine right after the
        # other served one took ~1 s more (measured, quick sizes: 0.9-1.05 s against 0.03-0.09 s),
        # a cost of sharing a core that round robin, switching engines at every request, pays most
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.binds = ([str(c) for c in cores[-len(NAMES):]] if len(cores) >= len(NAMES)
                      and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ else [])

    def llm(self, name: str) -> dict[str, Any]:
        sizes = self.sizes
        # every document of both arms (round robin puts each of its documents on both servers, and
        # each request adds its partial last chunk), so nothing is evicted
        dram = (2 * self.stream.docs + 2) * sizes.doc_tokens * sizes.kv_bytes_per_token
        cfg = _kvtier_config(self.socks[name], dram, None, str(self.work / f"{name}.stats.json"))
        llm = _llm_kwargs(Path(self.model), sizes, int(1.5 * sizes.max_model_len), kv_transfer_config=cfg)
        pub, replay = self.events[name]
        llm["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub,
                                   "replay_endpoint": replay}
        return llm

    def start(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        for i, name in enumerate(NAMES):
            env = dict(os.environ)
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
            if self.binds:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.binds[i]
            self.servers[name] = Server(name, server_args(self.llm(name), free_port()), self.work / f"{name}.log", env)
        self.children.extend(self.servers.values())
        for server in self.servers.values():
            server.wait_up(timeout_s)
        instances = [f"{self.servers[n].url}={self.events[n][0]}={self.events[n][1]}" for n in NAMES]
        self.proxy = Child("proxy", routing_proxy_args(instances, self.sizes.block, free_port()),
                           self.work / "proxy.log")
        self.children.append(self.proxy)
        self.proxy.wait_up(60)
        return time.perf_counter() - t0

    def routing(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.proxy.url + "/routing", timeout=30) as r:
            out: dict[str, Any] = json.loads(r.read())
        return out

    def stop(self) -> None:
        for child in self.children:
            child.stop()
        for sock in self.socks.values():
            _stop_service(sock)


def on_one_of(servers: dict[str, Server], send: Callable[[], Any]) -> tuple[Any, str, float]:
    """(send()'s result, the server that recorded its TTFT, that TTFT): one request in flight."""
    before = {n: s.ttft_sum() for n, s in servers.items()}
    result = send()
    deadline = time.monotonic() + 30
    while True:  # a server records a request's stats right after answering it
        after = {n: s.ttft_sum() for n, s in servers.items()}
        grew = {n: after[n][1] - before[n][1] for n in servers}
        if sum(grew.values()) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    took = [n for n, g in grew.items() if g]
    if len(took) != 1 or grew[took[0]] != 1:
        raise RuntimeError(f"expected one more TTFT sample on one server, got {grew}")
    return result, took[0], after[took[0]][0] - before[took[0]][0]


def wait_for_events(pair: Pair, timeout_s: float = 30.0) -> dict[str, Any]:
    """The proxy's /routing once both servers' events (vLLM's GPU blocks and kvtier's CPU ones)
    have reached it; a RuntimeError saying what is missing otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = pair.routing()
        urls = [pair.servers[n].url for n in NAMES]
        missing = [f"{n}: {m} blocks" for n, u in zip(NAMES, urls, strict=True) for m in ("GPU", "CPU")
                   if not stats["blocks"].get(u, {}).get(m)]
        if not missing:
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM's KV events did not reach the routing proxy within {timeout_s} s "
                               f"(none seen for {', '.join(missing)}); its /routing: {json.dumps(stats)}; "
                               f"logs under {pair.work}")
        time.sleep(0.2)


def run_stream(pair: Pair, stream: Stream, seed: int, warm: bool = True) -> list[dict[str, Any]]:
    """Both arms' requests, interleaved one for one; a row per request. `warm`: before each, one
    short fixed prompt to each server (not measured, not routed; after its first time a hit of
    one partial chunk), so no engine is measured right after sitting idle: measured without it,
    a hit sent to the engine that had not served the previous request took 0.2-1.0 s where one
    sent to the same engine took ~0.12 s, a cost of taking turns on one machine that round robin,
    switching engines at every request, would pay most."""
    sizes, model, servers = pair.sizes, pair.model, pair.servers
    rng = random.Random(seed)
    streams = {arm: arm_stream(sizes, stream, rng) for arm in ARMS}
    pings = {n: [rng.randrange(3, sizes.vocab) for _ in range(16)] for n in NAMES}
    rows: list[dict[str, Any]] = []
    for k in range(len(streams[ARMS[0]])):
        for arm in (ARMS if k % 2 == 0 else ARMS[::-1]):
            if warm:
                for n in NAMES:
                    servers[n].complete(model, pings[n])
            rnd, doc, ids = streams[arm][k]
            target = pair.proxy.url if arm == "cache_aware" else servers[NAMES[k % 2]].url

            def send(target: str = target, ids: list[int] = ids) -> tuple[int, dict[str, Any], float]:
                return post(target + "/v1/completions", completion(model, ids))

            (status, answer, wall), server, ttft = on_one_of(servers, send)
            if status != 200:
                raise RuntimeError(f"{arm}: {target} answered {status}: {str(answer)[:400]}")
            rows.append({"arm": arm, "round": rnd, "doc": doc, "server": server, "ttft_s": ttft, "wall_s": wall,
                         "cached": cached_of(answer), "prompt_tokens": len(ids), "token": token_of(answer)})
    return rows


def report(rows: list[dict[str, Any]], stream: Stream) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        warm = [r for r in mine if r["round"] > 0]
        per_server = {n: sum(r["server"] == n for r in mine) for n in NAMES}
        # which server each document went to, round by round
        placement = {d: [r["server"] for r in mine if r["doc"] == d] for d in range(stream.docs)}
        out[arm] = {"mean_ttft_s": statistics.fmean(r["ttft_s"] for r in warm),
                    "p50_ttft_s": statistics.median(r["ttft_s"] for r in warm),
                    # the client's time (cache_aware's includes the proxy's hop and its routing)
                    "mean_wall_s": statistics.fmean(r["wall_s"] for r in warm),
                    "first_visit_ttft_s": statistics.fmean(r["ttft_s"] for r in mine if r["round"] == 0),
                    "cached_fraction": sum(r["cached"] for r in warm) / sum(r["prompt_tokens"] for r in warm),
                    "requests_per_server": per_server,
                    "max_load_share": max(per_server.values()) / (len(mine) / len(NAMES)),
                    "placement": placement, "ttft_s": [r["ttft_s"] for r in mine],
                    "cached_tokens": [r["cached"] for r in mine]}
    # the servers share the machine: a hit served right after the other server worked should cost
    # what one after the same server did (else co-location, not routing, is part of the gap)
    hits = [(prev["server"] != r["server"], r["ttft_s"]) for prev, r in zip(rows, rows[1:]) if r["cached"] > 0]
    switch = {"after_other_server": [t for s, t in hits if s], "after_same_server": [t for s, t in hits if not s]}
    out["hit_ttft_by_previous_server"] = {k: {"requests": len(v), "mean_ttft_s": statistics.fmean(v) if v else None}
                                          for k, v in switch.items()}
    ca, rr = out["cache_aware"]["mean_ttft_s"], out["round_robin"]["mean_ttft_s"]
    return {"cache_aware_ttft_s": ca, "round_robin_ttft_s": rr, "ttft_ratio": ca / rr,
            "cache_aware_cached_fraction": out["cache_aware"]["cached_fraction"],
            "round_robin_cached_fraction": out["round_robin"]["cached_fraction"],
            "max_load_share": out["cache_aware"]["max_load_share"], **out}


def run_routing_runs(quick: bool = False, timeout_s: float = 900.0, stream: Stream | None = None,
                     seed: int = 21, warm: bool = True) -> dict[str, Any]:
    """Start the two servers and the proxy, run both arms' streams; the `routing` row."""
    sizes: Sizes = QUICK if quick else Sizes()
    stream = stream or (Stream(docs=3, questions=3) if quick else Stream())
    cache = default_cache_dir() / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(sizes, cache)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-routing-"))
    pair = Pair(sizes, stream, model, work)
    started = time.perf_counter()
    try:
        init_s = pair.start(timeout_s)
        rng = random.Random(5)
        for name in NAMES:  # each server's one-time set-up, not measured; their events reach the proxy
            ids = [rng.randrange(3, sizes.vocab) for _ in range(sizes.doc_tokens + sizes.question_tokens)]
            pair.servers[name].complete(pair.model, ids)
        events_seen = wait_for_events(pair)
        rows = run_stream(pair, stream, seed, warm)
        (work / "rows.json").write_text(json.dumps(rows))
        routing = pair.routing()
    finally:
        pair.stop()
    result = report(rows, stream)
    result["proxy"] = routing
    result["details"] = {
        "fairness": "both arms on the same two servers, requests interleaved one for one (the first arm "
                    "alternating), one in flight at a time; each arm on its own documents of the same lengths "
                    "(disjoint: no arm can hit the other's); kvtier's DRAM holds every document of both arms "
                    "on each server (no evictions)",
        "ttft": "each server's own vllm:time_to_first_token_seconds, of the server that took the request; "
                "means over rounds after each document's first visit",
        "round_robin": "r0, r1, r0, ... over the interleaved stream of one arm; an odd number of documents, "
                       "so consecutive questions on a document alternate servers",
        "docs": stream.docs, "questions_per_doc": stream.questions, "prompt_tokens": sizes.doc_tokens + sizes.question_tokens,
        "block_tokens": sizes.block, "vllm_kv_tokens": int(1.5 * sizes.max_model_len),
        "kvtier_dram_bytes": (2 * stream.docs + 2) * sizes.doc_tokens * sizes.kv_bytes_per_token,
        "events_after_setup": {"blocks": events_seen["blocks"], "subscribers": events_seen["subscribers"]},
        "warm_pings": "before each measured request, a fixed 16-token prompt to each server" if warm else None,
        "omp_threads_bind": dict(zip(NAMES, pair.binds, strict=True)) if pair.binds else "vLLM's (auto or the environment's)",
        "init_s": init_s, "seconds": time.perf_counter() - started, "quick": quick, "work_folder": str(work),
    }
    return result
