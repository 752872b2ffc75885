"""The fleet bench's two engine runs (issue 19), on `bench vllm`'s long-document QA workload.

Four vLLM engines, one after another, each in a subprocess with its own `kvtier serve` (its own
socket and shared-memory pool, as on its own host); the last three share one folder as their
lower tier (lower_tiers shared_folder), as hosts mounting one NFS folder would:
  kvtier_dram  the reference: one kv_both instance, warm-up round then the measured rounds (the
               documents are DRAM hits, the questions computed), as `bench vllm` runs it
  prefill      kv_producer: the measured rounds' prompts with {"do_remote_decode": true}; it
               computes them (vLLM's own answer: the first-token reference) and returns handoffs
  shared       kv_both, another instance: the same prompts, no handoffs (hits from the folder)
  decode       kv_consumer, another instance: the same prompts with the prefill's handoffs
Reported:
  vllm_shared  ttft_ratio = shared's mean TTFT / kvtier_dram's; same_tokens (first tokens = prefill's)
  pd           ttft_ratio = decode's mean TTFT / kvtier_dram's; prefill_plus_decode_ttft_s (the two
               calls' TTFTs added: what a client of the proxy waits, less the proxy's own hops; the
               proxy itself is not in this run); max_computed_chunks (the most prompt chunks the
               decode instance computed for one request); same_tokens
Each request is sent alone with max_tokens=1 (runner.py), so its wall time is its TTFT. Every
engine first answers two unrelated prompts (not measured): an engine's first requests cost
seconds of one-time set-up, which kvtier_dram's warm-up round absorbs and the others must too.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from kvtier.bench.vllm import (
    QUICK,
    Sizes,
    _kvtier_config,
    _llm_kwargs,
    _phase,
    _run_engine,
    _stop_service,
    build_model,
    workloads,
)
from kvtier.core.config import default_cache_dir

ASK = {"do_remote_decode": True}


def _shared_config(role: str, socket_path: str, dram_bytes: int, shared: str, stats: str) -> dict[str, Any]:
    cfg = _kvtier_config(socket_path, dram_bytes, None, stats)
    cfg["kv_role"] = role
    extra = cfg["kv_connector_extra_config"]
    extra["store"]["lower_tiers"] = [{"shared_folder": {"root": shared, "owner": role == "kv_producer"}}]
    extra["remote_wait_s"] = 30.0
    return cfg


def _mean_ttft(rows: list[dict[str, Any]]) -> float:
    return statistics.fmean(r["ttft_s"] for r in rows)


def run_engine_runs(quick: bool = False, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the four engines; return {"vllm_shared": {...}, "pd": {...}, "details": {...}}."""
    sizes: Sizes = QUICK if quick else Sizes()
    cache = default_cache_dir() / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(sizes, cache)
    warm, rounds, _ = workloads(sizes)
    prompts = [p for r in rounds for p in r]
    rng = random.Random(11)
    length = sizes.doc_tokens + sizes.question_tokens
    unrelated = [[rng.randrange(3, sizes.vocab) for _ in range(length)] for _ in range(2)]
    settle = {"name": "engine_warmup", "prompts": unrelated, "measure": False}
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-pd-"))
    shared = work / "shared"
    shared.mkdir()
    small_kv = int(1.5 * sizes.max_model_len)
    dram = 2 * (sizes.docs + 1) * sizes.doc_tokens * sizes.kv_bytes_per_token
    outs: dict[str, dict[str, Any]] = {}
    measured = [settle, {"name": "measured", "prompts": prompts}]
    try:
        sock = f"/tmp/kvtier-benchpd-{os.getpid()}-dram.sock"
        stats = str(work / "kvtier_dram.stats.json")
        try:
            phases = [{"name": "warmup", "prompts": warm, "measure": False}, *measured]
            outs["kvtier_dram"] = _run_engine("kvtier_dram", {"llm": _llm_kwargs(
                model, sizes, small_kv, kv_transfer_config=_kvtier_config(sock, dram, None, stats)),
                "phases": phases}, work, timeout_s)
        finally:
            _stop_service(sock)
        socks = {name: f"/tmp/kvtier-benchpd-{os.getpid()}-{name}.sock" for name in ("prefill", "shared", "decode")}
        try:
            cfg = _shared_config("kv_producer", socks["prefill"], dram, str(shared), str(work / "prefill.stats.json"))
            outs["prefill"] = _run_engine("prefill", {"llm": _llm_kwargs(model, sizes, small_kv, kv_transfer_config=cfg),
                                                      "phases": [settle, {"name": "measured", "prompts": prompts,
                                                                          "kv_transfer_params": [ASK] * len(prompts)}]},
                                          work, timeout_s)
            handoffs = [r["kv_transfer_params"] for r in _phase(outs["prefill"], "measured")["requests"]]
            cfg = _shared_config("kv_both", socks["shared"], dram, str(shared), str(work / "shared.stats.json"))
            outs["shared"] = _run_engine("shared", {"llm": _llm_kwargs(model, sizes, small_kv, kv_transfer_config=cfg),
                                                    "phases": measured}, work, timeout_s)
            cfg = _shared_config("kv_consumer", socks["decode"], dram, str(shared), str(work / "decode.stats.json"))
            outs["decode"] = _run_engine("decode", {"llm": _llm_kwargs(model, sizes, small_kv, kv_transfer_config=cfg),
                                                    "phases": [settle, {"name": "measured", "prompts": prompts,
                                                                        "kv_transfer_params": handoffs}]},
                                          work, timeout_s)
        finally:
            for sock in socks.values():
                _stop_service(sock)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return report(outs, sizes, work)


def report(outs: dict[str, dict[str, Any]], sizes: Sizes, work: Path) -> dict[str, Any]:
    rows = {name: _phase(out, "measured")["requests"] for name, out in outs.items()}
    ref_ttft = _mean_ttft(rows["kvtier_dram"])
    reference = [r["token"] for r in rows["prefill"]]
    chunk = sizes.block  # the store's chunk is vLLM's block (the connector's default)
    computed_chunks = [math.ceil((r["prompt_tokens"] - r["cached"]) / chunk) for r in rows["decode"]]
    shared_ttft, decode_ttft = _mean_ttft(rows["shared"]), _mean_ttft(rows["decode"])
    return {
        "vllm_shared": {"ttft_ratio": shared_ttft / ref_ttft, "mean_ttft_s": shared_ttft,
                        "same_tokens": [r["token"] for r in rows["shared"]] == reference,
                        "cached_tokens": [r["cached"] for r in rows["shared"]]},
        "pd": {"ttft_ratio": decode_ttft / ref_ttft, "mean_ttft_s": decode_ttft,
               "prefill_plus_decode_ttft_s": statistics.fmean(
                   p["ttft_s"] + d["ttft_s"] for p, d in zip(rows["prefill"], rows["decode"], strict=True)),
               "max_computed_chunks": max(computed_chunks),
               "same_tokens": [r["token"] for r in rows["decode"]] == reference,
               "cached_tokens": [r["cached"] for r in rows["decode"]]},
        "details": {"reference": "kvtier_dram: one kv_both instance, its DRAM hits (documents), questions computed",
                    "kvtier_dram_mean_ttft_s": ref_ttft, "prefill_mean_ttft_s": _mean_ttft(rows["prefill"]),
                    "prompt_tokens": [r["prompt_tokens"] for r in rows["decode"]], "chunk_tokens": chunk,
                    "init_s": {k: v["init_s"] for k, v in outs.items()}, "quick": sizes == QUICK,
                    "work_folder": str(work)},
    }
