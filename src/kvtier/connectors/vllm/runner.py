"""Run one list of prompts through one vLLM engine and time each request (for `kvtier bench vllm`).

    python -m kvtier.connectors.vllm.runner SPEC.json OUT.json

SPEC: {"llm": {vllm.LLM kwargs}, "phases": [{"name": str, "prompts": [[ids]], "measure": bool,
       "drop_cache_dir": str?, "kv_transfer_params": [dict | null]?}], "kvtier_stats_socket": str?}
A phase's kv_transfer_params (one per prompt) go with its requests (prefill/decode handoffs,
connectors/vllm/pd.py); each row then keeps the kv_transfer_params its output returned.
Each prompt is sent alone (one request in flight), with max_tokens=1 and top-2 logprobs, so
the wall time of the call is its time to first token. OUT: per phase, per request
{"ttft_s", "token", "gap", "cached"} (gap = top-1 minus top-2 logprob), and at the end of the
phase "vllm_counters", vLLM's own prefix-cache counters (COUNTERS, from LLM.get_metrics(),
so the engine needs disable_log_stats=False), and "stats", the kvtier scheduler's counters
file when the phase names one (the scheduler rewrites it while it plans a step, before that
step's output reaches this process, so no wait is needed).
Lives here because only kvtier.connectors may import vLLM; bench/vllm.py drives it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# vLLM's prefix-cache counters (tokens): its own KV cache's hits, a KV connector's hits, and
# the cached prompt tokens of both
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:external_prefix_cache_queries",
            "vllm:external_prefix_cache_hits", "vllm:prompt_tokens_cached")


def drop_page_cache(root: str) -> None:
    """Evict the files under `root` from the page cache (posix_fadvise DONTNEED after a sync)."""
    os.sync()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(**spec["llm"])
    init_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False, logprobs=2)
    phases = []
    for phase in spec["phases"]:
        rows = []
        params = phase.get("kv_transfer_params") or [None] * len(phase["prompts"])
        for ids, kv_params in zip(phase["prompts"], params, strict=True):
            if phase.get("drop_cache_dir"):
                drop_page_cache(phase["drop_cache_dir"])
            req_sp = sp if kv_params is None else sp.clone()
            if kv_params is not None:
                req_sp.extra_args = {"kv_transfer_params": kv_params}
            t = time.perf_counter()
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], req_sp, use_tqdm=False)
            ttft = time.perf_counter() - t
            comp = out.outputs[0]
            token = int(comp.token_ids[0])
            gap = None
            if comp.logprobs:
                vals = sorted((lp.logprob for lp in comp.logprobs[0].values()), reverse=True)
                gap = vals[0] - vals[1] if len(vals) > 1 else None
            rows.append({"ttft_s": ttft, "token": token, "gap": gap, "cached": int(out.num_cached_tokens or 0),
                         "prompt_tokens": len(ids), "kv_transfer_params": out.kv_transfer_params})
        entry = {"name": phase["name"], "measure": phase.get("measure", True), "requests": rows,
                 "vllm_counters": vllm_counters(llm)}
        if phase.get("stats_path"):
            with open(phase["stats_path"]) as f:  # a missing or unreadable file fails the run
                entry["stats"] = json.load(f)
        phases.append(entry)
    return {"init_s": init_s, "phases": phases}


def vllm_counters(llm: Any) -> dict[str, float]:
    """COUNTERS summed over engines (only those vLLM reports; the bench refuses a run without them)."""
    from vllm.v1.metrics.reader import Counter

    totals: dict[str, float] = {}
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in COUNTERS:
            totals[metric.name] = totals.get(metric.name, 0) + metric.value
    return totals


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
