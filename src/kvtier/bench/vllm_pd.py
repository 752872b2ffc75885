"""The fleet bench's engine runs (issue 19), on `bench vllm`'s long-document QA workload.

Five vLLM OpenAI servers run at once (bench/vllm_servers.py), each with its own `kvtier serve`
(its own socket and shared-memory pool, as on its own host), and `kvtier proxy` in front of two:
  dram          the reference: kv_both, DRAM only; a warm-up round puts the documents in its DRAM,
                so a measured prompt is a DRAM hit of its document, its question computed
  prefill       kv_producer; lower tiers: a shared folder and a 3-master Redis Cluster on loopback
  decode        kv_consumer over the shared folder; the proxy sends it the prefill's handoff
  shared        kv_both over the shared folder: another host, no handoff (vllm_shared, folder)
  shared_redis  kv_both over the Redis Cluster (vllm_shared, redis)
Each measured prompt goes, one request in flight at a time, first through the proxy (prefill,
then decode with the handoff: the client's wall time is the end-to-end TTFT), then, once the
prefill's service has written its chunks to both shared tiers, to dram, shared and shared_redis,
and last to the prefill server without a handoff (vLLM's own answer, the token reference: a
kv_producer loads nothing). TTFTs are the servers' own (vllm:time_to_first_token_seconds), so
every ratio compares requests measured the same way, interleaved, under the same load.
`repeats` runs the whole workload again on fresh documents (the same servers): each ratio is
reported per repeat and as their median.
Reported:
  vllm_shared  ttft_ratio: shared's mean TTFT / dram's, same_tokens; the same for "redis"
               (shared_redis); first_visit_ttft_ratio: only the first question on each document
               (every chunk from the shared tier; later ones find the document in their own DRAM).
               The folder's files are dropped from the page cache before each of shared's
               requests (this host wrote them; another host's would not hold them)
  pd           ttft_ratio: decode's mean TTFT / dram's (the decode instance reads the handoff
               right after the prefill wrote it, from this host's page cache as a same-host
               reader would; no cold read is measured there); e2e_ttft_s and e2e_ttft_ratio: the
               client's wall time through the proxy (prefill + handoff + decode + the proxy's
               hops) over dram's TTFT; e2e_over_prefill: that wall time over the prefill server's
               own TTFT of the prompt (vLLM computing it whole); max_computed_chunks (the most prompt chunks the decode
               instance computed for one request); same_tokens
  pd.faults    store_cleared, identity, decode_down, prefill_killed (run_faults), each with the
               client's status, token check and wall time against its bound
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.bench.common import drop_folder_cache
from kvtier.bench.vllm import QUICK, Sizes, _kvtier_config, _llm_kwargs, _stop_service, build_model
from kvtier.bench.vllm_servers import (
    Child,
    Server,
    cached_of,
    completion,
    free_port,
    post,
    proxy_args,
    server_args,
    token_of,
)
from kvtier.core.config import default_cache_dir

ASK = {"do_remote_decode": True}
REMOTE_WAIT_S = 30.0  # the decode instance's bound on waiting for a handoff's chunks
PREFILL_TIMEOUT_S = 600.0  # the proxy's bound on the prefill call (its default is 120 s; a shared CPU is slow)
CONNECT_TIMEOUT_S = 5.0  # the proxy's default
NAMES = ("dram", "prefill", "decode", "shared", "shared_redis")


def _tier_config(role: str, socket_path: str, dram_bytes: int, lower: list[dict[str, Any]],
                 stats: str) -> dict[str, Any]:
    cfg = _kvtier_config(socket_path, dram_bytes, None, stats)
    cfg["kv_role"] = role
    extra = cfg["kv_connector_extra_config"]
    extra["store"]["lower_tiers"] = lower
    extra["remote_wait_s"] = REMOTE_WAIT_S
    return cfg


def workload(sizes: Sizes, seed: int) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """(warm-up prompts, measured prompts, first question on its document?) on fresh documents."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, sizes.vocab) for _ in range(n)]

    docs = [toks(sizes.doc_tokens) for _ in range(sizes.docs)]
    warm = [d + toks(sizes.question_tokens) for d in docs]
    measured, first = [], []
    for r in range(sizes.rounds):
        for d in docs:
            measured.append(d + toks(sizes.question_tokens))
            first.append(r == 0)
    return warm, measured, first


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


class Fleet:
    """The five servers, the proxies and the Redis Cluster of one bench run."""

    def __init__(self, sizes: Sizes, model: Path, work: Path, redis_url: str, redis_ns: str) -> None:
        self.sizes, self.model, self.work = sizes, str(model), work
        self.shared = work / "shared"
        self.shared.mkdir()
        self.redis_url, self.redis_ns = redis_url, redis_ns
        self.socks = {n: f"/tmp/kvtier-benchpd-{os.getpid()}-{n}.sock" for n in NAMES}
        self.servers: dict[str, Server] = {}
        self.children: list[Child] = []
        self._redis: Any = None

    def llm(self, name: str) -> dict[str, Any]:
        sizes = self.sizes
        # two repeats' documents: one repeat's documents, questions and the settling prompts overflow
        # a pool of docs + 1 documents, and the reference then misses (measured: 2 of 8 prompts)
        dram = 2 * (sizes.docs + 1) * sizes.doc_tokens * sizes.kv_bytes_per_token
        folder = {"shared_folder": {"root": str(self.shared), "owner": name == "prefill"}}
        redis = {"redis": {"url": self.redis_url, "cluster": True, "namespace": self.redis_ns, "timeout_s": 5.0}}
        role, lower = {"dram": ("kv_both", []), "prefill": ("kv_producer", [folder, redis]),
                       "decode": ("kv_consumer", [folder]), "shared": ("kv_both", [folder]),
                       "shared_redis": ("kv_both", [redis])}[name]
        cfg = _tier_config(role, self.socks[name], dram, lower, str(self.work / f"{name}.stats.json"))
        return _llm_kwargs(Path(self.model), sizes, int(1.5 * sizes.max_model_len), kv_transfer_config=cfg)

    def start(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        for name in NAMES:
            self.servers[name] = Server(name, server_args(self.llm(name), free_port()), self.work / f"{name}.log", env)
        self.children.extend(self.servers.values())
        pre, dec = self.servers["prefill"].url, self.servers["decode"].url
        self.proxy = Child("proxy", proxy_args(pre, dec, free_port(), PREFILL_TIMEOUT_S), self.work / "proxy.log")
        # the proxy given a decode instance that is down (nothing listens at its port)
        dead = f"http://127.0.0.1:{free_port()}"
        self.proxy_dead = Child("proxy_dead", proxy_args(pre, dead, free_port(), PREFILL_TIMEOUT_S),
                                self.work / "proxy_dead.log")
        self.children += [self.proxy, self.proxy_dead]
        for server in self.servers.values():
            server.wait_up(timeout_s)
        self.proxy.wait_up(60)
        self.proxy_dead.wait_up(60, any_status=True)
        return time.perf_counter() - t0

    def stop(self) -> None:
        for child in self.children:
            child.stop()
        for sock in self.socks.values():
            _stop_service(sock)

    def published(self, handoff: dict[str, Any]) -> Callable[[], bool]:
        """True once the prefill's service has written the handoff's last chunk (the chain's tail,
        written last) to the folder and to the Redis Cluster."""
        from redis.cluster import RedisCluster

        from kvtier.tiers.disk import chunk_path
        from kvtier.tiers.redis import redis_key_name

        last = bytes.fromhex(handoff["last_key"])
        path = chunk_path(str(self.shared), last)
        name = redis_key_name(self.redis_ns, bytes.fromhex(handoff["layout"]), last)
        if self._redis is None:
            self._redis = RedisCluster.from_url(self.redis_url)
        client = self._redis
        return lambda: os.path.exists(path) and bool(client.exists(name))


def run_workload(fleet: Fleet, seed: int) -> dict[str, Any]:
    """One pass of the workload on fresh documents; the rows of every server."""
    sizes, model, servers = fleet.sizes, fleet.model, fleet.servers
    warm, measured, first = workload(sizes, seed)
    for ids in warm:
        servers["dram"].complete(model, ids)  # its documents into its DRAM
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in (*NAMES, "e2e")}
    for ids in measured:
        def through_proxy(ids: list[int] = ids) -> tuple[int, dict[str, Any], float]:
            return post(fleet.proxy.url + "/v1/completions", completion(model, ids))

        # a prefill the proxy gave up on (prefill_timeout_s) is aborted and records no TTFT
        ((status, answer, wall), prefill_ttft), decode_ttft = servers["decode"].ttft_of(
            lambda: servers["prefill"].ttft_of(through_proxy, required=False))
        if status != 200:
            raise RuntimeError(f"the proxy answered {status}: {str(answer)[:400]}")
        rows["e2e"].append({"ttft_s": wall, "token": token_of(answer)})
        rows["decode"].append({"ttft_s": decode_ttft, "token": token_of(answer), "cached": cached_of(answer),
                               "prompt_tokens": len(ids)})
        # vLLM's own answer, and the handoff the proxy forwarded (not returned to clients): the
        # prompt again at the prefill server, which loads nothing (a kv_producer); vLLM's own
        # prefix cache may hold it
        answer, _ = servers["prefill"].complete(model, ids, kv_transfer_params=ASK)
        rows["prefill"].append({"ttft_s": prefill_ttft, "token": token_of(answer), "prompt_tokens": len(ids)})
        handoff = (answer.get("kv_transfer_params") or {}).get("kvtier")
        if not isinstance(handoff, dict) or not handoff.get("last_key"):
            raise RuntimeError(f"the prefill server returned no handoff: {answer.get('kv_transfer_params')}")
        # the prefill's service writes its chunks to both shared tiers in the background, in chain order
        _wait(fleet.published(handoff), 120, "the prefill's chunks in the shared folder and Redis")
        for name in ("dram", "shared", "shared_redis"):
            if name == "shared":  # "another host": the folder's files are not in its memory (this host wrote them)
                drop_folder_cache(fleet.shared)
            answer, ttft = servers[name].complete(model, ids)
            rows[name].append({"ttft_s": ttft, "token": token_of(answer), "cached": cached_of(answer),
                               "prompt_tokens": len(ids)})
    return {"rows": rows, "first_visit": first}


def run_faults(fleet: Fleet, seed: int, kill_after_s: float) -> dict[str, Any]:
    """The faults, on fresh prompts, each timed from the client's side; the prefill server is
    killed last. Tokens are checked against dram's answer (vLLM computing the whole prompt)."""
    sizes, model, servers = fleet.sizes, fleet.model, fleet.servers
    rng = random.Random(seed)
    length = sizes.doc_tokens + sizes.question_tokens
    prompts = [[rng.randrange(3, sizes.vocab) for _ in range(length)] for _ in range(4)]  # unrelated, unseen
    out: dict[str, Any] = {}

    def reference(ids: list[int]) -> int | None:
        return token_of(servers["dram"].complete(model, ids)[0])

    # the store cleared between prefill and decode: the decode instance waits, then computes
    ids = prompts[0]
    answer, _ = servers["prefill"].complete(model, ids, kv_transfer_params=ASK)
    params = answer["kv_transfer_params"]
    _wait(fleet.published(params["kvtier"]), 120, "the prefill's chunks in the shared folder")
    removed = 0
    for file in fleet.shared.glob("chunks/*/*.kvc"):  # as an operator's rm would (the owner holds the folder)
        file.unlink()
        removed += 1
    status, answer, wall = post(servers["decode"].url + "/v1/completions", completion(model, ids,
                                                                                     kv_transfer_params=params))
    out["store_cleared"] = {"status": status, "same_token": token_of(answer) == reference(ids), "wall_s": wall,
                            "cached": cached_of(answer), "files_removed": removed,
                            "bound": f"remote_wait_s ({REMOTE_WAIT_S} s) + the prompt's compute"}

    # a handoff made by an instance of another KV layout: refused, computed, reported back
    ids = prompts[1]
    answer, _ = servers["prefill"].complete(model, ids, kv_transfer_params=ASK)
    params = json.loads(json.dumps(answer["kv_transfer_params"]))
    params["kvtier"]["layout"] = "00" * 8 + params["kvtier"]["layout"][16:]
    status, answer, wall = post(servers["decode"].url + "/v1/completions", completion(model, ids,
                                                                                     kv_transfer_params=params))
    reported = answer.get("kv_transfer_params") or {}
    out["identity"] = {"status": status, "same_token": token_of(answer) == reference(ids), "wall_s": wall,
                       "cached": cached_of(answer), "reported": reported,
                       "bound": "no wait: refused at once, the prompt computed"}

    # the proxy given a decode instance that is down
    status, answer, wall = post(fleet.proxy_dead.url + "/v1/completions", completion(model, prompts[2]))
    out["decode_down"] = {"status": status, "wall_s": wall,
                          "message": str((answer.get("error") or {}).get("message", answer))[:240],
                          "bound": f"the prefill call + connect_timeout_s ({CONNECT_TIMEOUT_S} s)"}

    # the prefill instance killed mid-request: the proxy hands the request to the decode instance
    ids = prompts[3]
    ref = reference(ids)
    result: dict[str, Any] = {}

    def send() -> None:
        result["status"], result["answer"], result["wall_s"] = post(fleet.proxy.url + "/v1/completions",
                                                                    completion(model, ids))

    _, answered_before = servers["prefill"].ttft_sum()
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(kill_after_s)  # a fraction of the prefill's measured TTFT: it is computing the prompt
    _, answered = servers["prefill"].ttft_sum()
    servers["prefill"].kill()
    killed_while_running = answered == answered_before and sender.is_alive()  # before its first token
    sender.join()
    out["prefill_killed"] = {"status": result["status"], "same_token": token_of(result["answer"]) == ref,
                             "killed_while_running": killed_while_running, "killed_after_s": kill_after_s,
                             "wall_s": result["wall_s"], "cached": cached_of(result["answer"]),
                             "bound": f"prefill_timeout_s ({PREFILL_TIMEOUT_S} s) + the decode instance's compute"}
    return out


def run_engine_runs(quick: bool = False, timeout_s: float = 900.0, repeats: int = 1) -> dict[str, Any]:
    """Start the fleet, run the workload `repeats` times on fresh documents, then the faults;
    return {"vllm_shared": {...}, "pd": {... "faults": {...}}, "details": {...}}."""
    from kvtier.bench.redis_servers import RedisClusterServers, redis_server_available

    if not redis_server_available():
        raise RuntimeError("the engine runs need redis-server and redis-cli (a Redis Cluster on loopback)")
    sizes: Sizes = QUICK if quick else Sizes()
    cache = default_cache_dir() / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(sizes, cache)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-pd-"))
    cluster = RedisClusterServers(work / "redis").start()
    fleet = Fleet(sizes, model, work, cluster.url, f"benchpd{os.getpid()}")
    try:
        init_s = fleet.start(timeout_s)
        rng = random.Random(5)
        settle = [[rng.randrange(3, sizes.vocab) for _ in range(sizes.doc_tokens + sizes.question_tokens)]
                  for _ in range(2)]
        for ids in settle:  # every server's one-time set-up, not measured
            post(fleet.proxy.url + "/v1/completions", completion(fleet.model, ids))
            for name in ("dram", "shared", "shared_redis"):
                fleet.servers[name].complete(fleet.model, ids)
        runs = []
        for r in range(repeats):
            runs.append(run_workload(fleet, seed=100 + r))
            (work / "runs.json").write_text(json.dumps(runs))  # kept if a later step fails
        try:
            prefill = [r["ttft_s"] for run in runs for r in run["rows"]["prefill"] if r["ttft_s"] is not None]
            faults = run_faults(fleet, seed=999, kill_after_s=0.3 * statistics.median(prefill))
        except Exception as e:  # noqa: BLE001 - reported in the JSON; the measured runs stand
            faults = {"error": f"{type(e).__name__}: {e}"}
    finally:
        fleet.stop()
        cluster.stop()
        shutil.rmtree(fleet.shared, ignore_errors=True)
    result = report(runs, sizes)
    result["pd"]["faults"] = faults
    result["details"]["init_s"] = init_s
    result["details"]["work_folder"] = str(work)
    return result


def _mean(rows: list[dict[str, Any]], keep: list[bool] | None = None) -> float:
    return statistics.fmean(r["ttft_s"] for i, r in enumerate(rows) if keep is None or keep[i])


def _one(run: dict[str, Any], chunk: int) -> dict[str, Any]:
    rows, first = run["rows"], run["first_visit"]
    # the reference is a DRAM hit of the prompt's document: a prompt where dram missed (its pool
    # overflowed) is no reference, and is left out of every mean of the ratios alike
    hit = [r["cached"] > 0 for r in rows["dram"]]
    first = [f and h for f, h in zip(first, hit, strict=True)]
    ref = _mean(rows["dram"], hit)
    reference = [r["token"] for r in rows["prefill"]]

    def shared(name: str) -> dict[str, Any]:
        return {"ttft_ratio": _mean(rows[name], hit) / ref, "mean_ttft_s": _mean(rows[name], hit),
                "first_visit_ttft_ratio": _mean(rows[name], first) / _mean(rows["dram"], first),
                "same_tokens": [r["token"] for r in rows[name]] == reference,
                "cached_tokens": [r["cached"] for r in rows[name]]}

    computed = [math.ceil((r["prompt_tokens"] - r["cached"]) / chunk) for r in rows["decode"]]
    return {
        "dram_mean_ttft_s": ref, "reference_misses": hit.count(False),
        "folder": shared("shared"), "redis": shared("shared_redis"),
        "pd": {"ttft_ratio": _mean(rows["decode"], hit) / ref, "mean_ttft_s": _mean(rows["decode"], hit),
               "first_visit_ttft_ratio": _mean(rows["decode"], first) / _mean(rows["dram"], first),
               "e2e_ttft_s": _mean(rows["e2e"], hit), "e2e_ttft_ratio": _mean(rows["e2e"], hit) / ref,
               "prefill_ttft_s": statistics.fmean(r["ttft_s"] for r in rows["prefill"] if r["ttft_s"] is not None),
               # what disaggregation adds to vLLM computing the prompt: the proxy's hops, the handoff,
               # the decode instance's wait and load (prompts the proxy gave up prefilling left out)
               "e2e_over_prefill": statistics.fmean(e["ttft_s"] / p["ttft_s"] for e, p in zip(
                   rows["e2e"], rows["prefill"], strict=True) if p["ttft_s"] is not None),
               "prefill_fallbacks": sum(r["ttft_s"] is None for r in rows["prefill"]),
               "max_computed_chunks": max(computed), "same_tokens": [r["token"] for r in rows["decode"]] == reference,
               "cached_tokens": [r["cached"] for r in rows["decode"]]},
    }


def report(runs: list[dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    """Per-repeat figures and their medians (ratios), all-of (token checks), max (computed chunks)."""
    chunk = sizes.block  # the store's chunk is vLLM's block (the connector's default)
    each = [_one(run, chunk) for run in runs]

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(e) for e in each)

    vllm_shared: dict[str, Any] = {}
    for tier in ("folder", "redis"):
        vllm_shared[tier] = {"ttft_ratio": statistics.median(e[tier]["ttft_ratio"] for e in each),
                             "first_visit_ttft_ratio": statistics.median(e[tier]["first_visit_ttft_ratio"] for e in each),
                             "same_tokens": all(e[tier]["same_tokens"] for e in each),
                             "per_repeat": [e[tier] for e in each]}
    vllm_shared["ttft_ratio"] = max(vllm_shared[t]["ttft_ratio"] for t in ("folder", "redis"))
    vllm_shared["same_tokens"] = all(vllm_shared[t]["same_tokens"] for t in ("folder", "redis"))
    pd = {"ttft_ratio": med(lambda e: e["pd"]["ttft_ratio"]),
          "first_visit_ttft_ratio": med(lambda e: e["pd"]["first_visit_ttft_ratio"]),
          "e2e_ttft_ratio": med(lambda e: e["pd"]["e2e_ttft_ratio"]), "e2e_ttft_s": med(lambda e: e["pd"]["e2e_ttft_s"]),
          "e2e_over_prefill": med(lambda e: e["pd"]["e2e_over_prefill"]),
          "max_computed_chunks": max(e["pd"]["max_computed_chunks"] for e in each),
          "same_tokens": all(e["pd"]["same_tokens"] for e in each), "per_repeat": [e["pd"] for e in each]}
    return {"vllm_shared": vllm_shared, "pd": pd,
            "details": {"reference": "dram: one kv_both instance, its DRAM hits (documents), questions computed; "
                                     "TTFT as each server records it (vllm:time_to_first_token_seconds)",
                        "ttft_ratio": "vllm_shared.ttft_ratio is the larger of folder's and redis's; ratios are "
                                      "medians over repeats", "repeats": len(runs),
                        "dram_mean_ttft_s": [e["dram_mean_ttft_s"] for e in each],
                        "reference_misses": [e["reference_misses"] for e in each],
                        "prompt_tokens": sizes.doc_tokens + sizes.question_tokens, "chunk_tokens": chunk,
                        "quick": sizes == QUICK}}
