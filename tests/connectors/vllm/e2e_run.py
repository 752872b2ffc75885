"""One vLLM engine run for the end-to-end tests (run as a subprocess: vLLM spawns processes).

    python e2e_run.py MODEL_DIR OUT.json baseline            all prompts, no connector
    python e2e_run.py MODEL_DIR OUT.json save   SOCKET STORE_DIR   first process: computes and saves
    python e2e_run.py MODEL_DIR OUT.json reuse  SOCKET STORE_DIR   second process: hits, then faults
    python e2e_run.py MODEL_DIR OUT.json save8  SOCKET STORE_DIR   as save, store chunks of 8 tokens (block 32)
    python e2e_run.py MODEL_DIR OUT.json reuse8 SOCKET STORE_DIR   hits ending inside blocks; vLLM's prefix
                                                                   cache on, so a second round mixes its hits

Writes {"rounds": {name: [{"tokens": [...], "cached": n}, ...]}} with one entry per prompt.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

BLOCK = 32


def prompts() -> dict[str, list[int]]:
    rng = random.Random(1234)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 500) for _ in range(n)]

    shared = toks(96)
    p1, p2 = toks(100), toks(150)
    return {
        "p1": p1, "p2": p2,
        "p3": shared + toks(34), "p4": shared + toks(44),  # share 3 chunks, one batch in run "save"
        "p5": p1[:64] + toks(60), "p6": p1[:64] + toks(70),  # share p1's first 2 chunks, one batch in "reuse"
        "p7": p2 + toks(10),  # p2's 4 full chunks (128 tokens) + more
    }


def make_llm(model: str, kv_transfer_config: dict | None, prefix_caching: bool = False):
    from vllm import LLM

    return LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=512,
               max_num_seqs=4, max_num_batched_tokens=512, block_size=BLOCK, kv_cache_memory_bytes=16 * 2**20,
               enable_prefix_caching=prefix_caching, kv_transfer_config=kv_transfer_config, disable_log_stats=True,
               seed=0)


def generate(llm, batch: list[list[int]]) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids), "cached": int(o.num_cached_tokens or 0)} for o in outs]


def kvtier_config(socket_path: str, store_dir: str, chunk_tokens: int = BLOCK, stats_path: str = "") -> dict:
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "socket_path": socket_path,
            "store": {"chunk_tokens": chunk_tokens, "memory": {"capacity_bytes": "32MiB"},
                      "disk": {"root": store_dir}},
            "retry_after_s": 0.5,
            "connect_timeout_s": 60,
            "stats_path": stats_path,
        },
    }


def corrupt_pool(socket_path: str) -> None:
    from kvtier.service.shm import shm_path_for

    path = shm_path_for(socket_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(os.urandom(size))


def kill_service(socket_path: str) -> int:
    with open(socket_path + ".lock") as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGKILL)
    return pid


def main() -> None:
    model, out, mode = sys.argv[1:4]
    ps = prompts()
    rounds: dict[str, list[dict]] = {}
    if mode == "baseline":
        llm = make_llm(model, None)
        names = list(ps)
        rounds["all"] = generate(llm, [ps[n] for n in names])
        result = {"names": names, "rounds": rounds}
    else:
        socket_path, store_dir = sys.argv[4:6]
        chunk = 8 if mode.endswith("8") else BLOCK
        stats_path = out + ".stats.json" if mode == "save" else ""  # the scheduler's counters
        llm = make_llm(model, kvtier_config(socket_path, store_dir, chunk, stats_path), prefix_caching=mode == "reuse8")
        if mode == "save8":
            rounds["single"] = generate(llm, [ps["p1"], ps["p2"]])
            rounds["pair"] = generate(llm, [ps["p3"], ps["p4"]])
        elif mode == "reuse8":
            rounds["hits"] = generate(llm, [ps[n] for n in ("p1", "p2", "p3", "p4", "p7")])
            rounds["again"] = generate(llm, [ps[n] for n in ("p1", "p2", "p3", "p4", "p7")])  # vLLM's own hits too
        elif mode == "save":
            rounds["single"] = generate(llm, [ps["p1"], ps["p2"]])
            rounds["pair"] = generate(llm, [ps["p3"], ps["p4"]])
        else:
            rounds["hits"] = generate(llm, [ps[n] for n in ("p1", "p2", "p3", "p4", "p7")])
            rounds["pair"] = generate(llm, [ps["p5"], ps["p6"]])
            corrupt_pool(socket_path)  # the store's DRAM now fails every checksum
            rounds["corrupt"] = generate(llm, [ps[n] for n in ("p1", "p2", "p3", "p4", "p7")])
            kill_service(socket_path)  # the store disappears mid-run
            time.sleep(0.5)
            rounds["dead"] = generate(llm, [ps[n] for n in ("p1", "p2", "p5")])
            rounds["dead_again"] = generate(llm, [ps["p7"]])
        result = {"rounds": rounds}
        if stats_path:
            with open(stats_path) as f:
                result["stats"] = json.load(f)
    with open(out, "w") as f:
        json.dump(result, f)



if __name__ == "__main__":
    main()
