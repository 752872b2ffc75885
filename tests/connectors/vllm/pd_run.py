"""One vLLM engine of the disaggregated end-to-end test (a subprocess: vLLM spawns processes).

    python pd_run.py MODEL OUT.json prefill SOCKET SHARED             kv_producer: max_tokens=1, asks for handoffs
    python pd_run.py MODEL OUT.json decode  SOCKET SHARED PARAMS.json  kv_consumer: decodes with the handoffs

Each engine has its own `kvtier serve` (SOCKET: its own shared-memory pool) and both have the
folder SHARED as their lower tier (a shared_folder tier, as two hosts mounting one NFS folder
would): the prefill service writes the chunks there, the decode service finds them there.
The prompts are e2e_run.py's, so its baseline run is vLLM alone's answer.
"""

from __future__ import annotations

import json
import os
import sys
import time

from e2e_run import BLOCK, make_llm, prompts  # type: ignore[import-not-found]

PREFILLED = ("p1", "p2", "p3", "p4")


def pd_config(role: str, socket_path: str, shared: str, stats_path: str = "") -> dict:
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "socket_path": socket_path,
            "store": {"chunk_tokens": BLOCK, "memory": {"capacity_bytes": "32MiB"},
                      "lower_tiers": [{"shared_folder": {"root": shared, "owner": role == "kv_producer"}}]},
            "retry_after_s": 0.5,
            "connect_timeout_s": 60,
            "remote_wait_s": 3.0,
            "stats_path": stats_path,
        },
    }


def generate(llm, batch: list[list[int]], max_tokens: int, params: list[dict | None]) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sps = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                          extra_args={"kv_transfer_params": p} if p is not None else None) for p in params]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sps, use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids), "cached": int(o.num_cached_tokens or 0),
             "kv_transfer_params": o.kv_transfer_params} for o in outs]


def in_shared(shared: str, params: dict | None) -> bool:
    """Whether the shared folder holds the handoff's last chunk (written after all its others)."""
    from kvtier.tiers.disk import chunk_path

    try:
        return os.path.exists(chunk_path(shared, bytes.fromhex(params["kvtier"]["last_key"])))  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return False


def wait_for_files(shared: str, params: dict[str, dict], timeout_s: float = 60.0) -> None:
    """Until the shared folder holds each handoff's last chunk (the service writes it in the background)."""
    from kvtier.tiers.disk import chunk_path

    paths = [chunk_path(shared, bytes.fromhex(p["kvtier"]["last_key"])) for p in params.values()]
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            raise SystemExit(f"the prefill service did not write {paths} within {timeout_s} s")
        time.sleep(0.1)


def main() -> None:
    model, out, mode, socket_path, shared = sys.argv[1:6]
    ps = prompts()
    if mode == "prefill":
        llm = make_llm(model, pd_config("kv_producer", socket_path, shared))
        ask = {"do_remote_decode": True}
        results = generate(llm, [ps[n] for n in PREFILLED], 1, [dict(ask) for _ in PREFILLED])
        params = {n: r["kv_transfer_params"] for n, r in zip(PREFILLED, results)}
        # the producer answers once its chunks are in the shared folder (publish_wait_s)
        in_folder = {n: in_shared(shared, p) for n, p in params.items()}
        wait_for_files(shared, params)
        result = {"params": params, "first": {n: r["tokens"] for n, r in zip(PREFILLED, results)},
                  "in_folder_at_answer": in_folder}
    else:
        stats = out + ".stats.json"
        with open(sys.argv[6]) as f:
            params = json.load(f)
        llm = make_llm(model, pd_config("kv_consumer", socket_path, shared, stats))
        rounds = {}
        rounds["pd"] = generate(llm, [ps[n] for n in ("p1", "p2", "p3")], 8, [params[n] for n in ("p1", "p2", "p3")])
        start = time.monotonic()
        rounds["lost"] = generate(llm, [ps["p4"]], 8, [params["p4"]])  # its last chunk was deleted in between
        lost_s = time.monotonic() - start
        rounds["mismatch"] = generate(llm, [ps["p5"]], 8, [params["p1"]])  # another prompt's handoff
        with open(stats) as f:
            result = {"rounds": rounds, "lost_s": lost_s, "stats": json.load(f)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
