"""One vLLM engine with kvtier for test_stats.py (a subprocess: vLLM spawns processes).

    python stats_engine_run.py MODEL_DIR OUT.json SOCKET STORE_DIR

Sends the same prompt twice (the second loads the first's chunks from the store), then writes
kvtier's series among vLLM's own metrics (LLM.get_metrics, vLLM's Prometheus registry):
{"counters": {name: value}, "histogram_counts": {name: count}, "cached": [n, n]}.
"""

from __future__ import annotations

import json
import random
import sys

from e2e_run import BLOCK, kvtier_config


def main() -> None:
    model, out_path, socket_path, store_dir = sys.argv[1:5]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.metrics.reader import Counter, Histogram

    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, max_num_batched_tokens=512, block_size=BLOCK, kv_cache_memory_bytes=16 * 2**20,
              enable_prefix_caching=False, kv_transfer_config=kvtier_config(socket_path, store_dir),
              disable_log_stats=False, seed=0)
    rng = random.Random(7)
    prompt = [rng.randrange(3, 500) for _ in range(100)]
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False)
    cached = []
    for _ in range(2):
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)
        cached.append(int(out.num_cached_tokens or 0))
    counters: dict[str, float] = {}
    histograms: dict[str, int] = {}
    for metric in llm.get_metrics():
        if "kvtier" not in metric.name:
            continue
        if isinstance(metric, Counter):
            counters[metric.name] = counters.get(metric.name, 0) + metric.value
        elif isinstance(metric, Histogram):
            histograms[metric.name] = histograms.get(metric.name, 0) + metric.count
    with open(out_path, "w") as f:
        json.dump({"counters": counters, "histogram_counts": histograms, "cached": cached}, f)


if __name__ == "__main__":
    main()
