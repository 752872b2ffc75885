"""Manual check (not collected by pytest): two vLLM OpenAI servers behind `kvtier proxy`.

    PYTHONPATH=src python tests/connectors/vllm/pd_proxy_run.py WORK_DIR

Builds the tiny test model, starts a kv_producer and a kv_consumer vLLM OpenAI server (each with
its own `kvtier serve`, one shared folder below both) and the proxy, then sends completions
(token-id prompts) through the proxy, streamed and not, and compares them with the prefill
instance's own full answer; then stops the decode server and checks the proxy's answer is a 503.
Prints one JSON line of results. Two engines run at once (a few GiB each).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from e2e_run import prompts  # type: ignore[import-not-found]  # noqa: E402
from pd_run import pd_config  # type: ignore[import-not-found]  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited (rc {proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"{url} did not come up")


def server(model: str, port: int, role: str, sock: str, shared: str, log: Path) -> subprocess.Popen:
    cfg = pd_config(role, sock, shared, str(log) + ".stats.json")
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--host", "127.0.0.1", "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "512", "--max-num-seqs", "4", "--block-size", "32",
            "--kv-cache-memory-bytes", str(16 * 2**20), "--no-enable-prefix-caching", "--seed", "0",
            "--kv-transfer-config", json.dumps(cfg)]
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="1")
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    from test_e2e import _stop_service, build_tiny_llama  # type: ignore[import-not-found]

    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_llama(model)
    shared = work / "shared"
    shared.mkdir(exist_ok=True)
    pp, dp, xp = free_port(), free_port(), free_port()
    socks = (f"/tmp/kvtier-pxp-{os.getpid()}.sock", f"/tmp/kvtier-pxd-{os.getpid()}.sock")
    procs = [server(str(model), pp, "kv_producer", socks[0], str(shared), work / "prefill.log"),
             server(str(model), dp, "kv_consumer", socks[1], str(shared), work / "decode.log")]
    proxy = subprocess.Popen([sys.executable, "-m", "kvtier", "proxy", "--prefill", f"http://127.0.0.1:{pp}",
                              "--decode", f"http://127.0.0.1:{dp}", "--port", str(xp)],
                             stdout=open(work / "proxy.log", "w"), stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        for port, proc in zip((pp, dp), procs):
            wait_up(f"http://127.0.0.1:{port}", proc)
        ps = prompts()
        name = str(model)
        for p in ("p1", "p2"):
            body = {"model": name, "prompt": ps[p], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            status, ref = post(f"http://127.0.0.1:{pp}/v1/completions", body)  # the prefill instance alone
            status2, got = post(f"http://127.0.0.1:{xp}/v1/completions", body)
            ref_ids = json.loads(ref)["choices"][0].get("token_ids")
            got_json = json.loads(got)
            out[p] = {"status": status2, "same_tokens": got_json["choices"][0].get("token_ids") == ref_ids,
                      "cached": (got_json.get("usage") or {}).get("prompt_tokens_details"),
                      "tokens": ref_ids}
        status, streamed = post(f"http://127.0.0.1:{xp}/v1/completions",
                                {"model": name, "prompt": ps["p3"], "max_tokens": 8, "temperature": 0,
                                 "ignore_eos": True, "stream": True, "return_token_ids": True})
        events = [line for line in streamed.decode().split("\n\n") if line.startswith("data: ")]
        out["stream"] = {"status": status, "events": len(events), "done": events[-1] == "data: [DONE]"}
        out["decode_stats"] = json.loads((work / "decode.log.stats.json").read_text())
        os.killpg(procs[1].pid, signal.SIGKILL)  # the decode instance goes down
        procs[1].wait()
        t = time.monotonic()
        status, body = post(f"http://127.0.0.1:{xp}/v1/completions", {"model": name, "prompt": ps["p4"],
                                                                      "max_tokens": 4})
        out["decode_down"] = {"status": status, "seconds": round(time.monotonic() - t, 2),
                              "message": json.loads(body)["error"]["message"][:120]}
        status, body = post(f"http://127.0.0.1:{xp}/v1/completions", {"prompt": 5})
        out["bad_request"] = {"status": status}
        status, body = post(f"http://127.0.0.1:{xp}/v1/completions", {"model": name})
        out["no_prompt"] = {"status": status, "message": json.loads(body)["error"]["message"]}
    finally:
        proxy.terminate()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for sock in socks:
            _stop_service(sock)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
