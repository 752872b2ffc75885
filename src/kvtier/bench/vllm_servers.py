"""vLLM OpenAI servers and `kvtier proxy` as child processes, for the fleet bench's engine runs.

Who calls: bench/vllm_pd.py. Only connectors/ import vLLM: a server here is the subprocess
`python -m vllm.entrypoints.openai.api_server`, each in its own session so that it (API server,
engine core and workers) can be killed as a group, as a crashed host would be. Prompts are token
ids (the servers skip tokenizer init); every answer carries its token ids (return_token_ids) and
its cached prompt tokens (--enable-prompt-tokens-details).

TTFT is read from each server's own vllm:time_to_first_token_seconds histogram (the request's
arrival at the engine to its first token, the same clock on every server), one request in
flight at a time: `Server.ttft_of(body)` sends the request and returns the histogram's sum delta.
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
from typing import Any

HOST = "127.0.0.1"
TTFT_METRIC = "vllm:time_to_first_token_seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 900.0) -> tuple[int, dict[str, Any], float]:
    """(status, JSON answer, seconds) of one POST; an HTTP error's body is its answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": {"message": f"{type(e).__name__}: {e}"}}, time.perf_counter() - t
    seconds = time.perf_counter() - t
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"raw": raw[:400].decode(errors="replace")}
    return status, answer if isinstance(answer, dict) else {"raw": answer}, seconds


def completion(model: str, ids: list[int], **extra: Any) -> dict[str, Any]:
    """One greedy token, not streamed, with its token ids in the answer."""
    return {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": False, **extra}


def token_of(answer: dict[str, Any]) -> int | None:
    try:
        return int(answer["choices"][0]["token_ids"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def cached_of(answer: dict[str, Any]) -> int:
    details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def server_args(llm: dict[str, Any], port: int) -> list[str]:
    """`vllm serve` arguments for the runner's LLM kwargs (bench/vllm.py's _llm_kwargs)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", llm["model"], "--host", HOST,
            "--port", str(port), "--skip-tokenizer-init", "--dtype", llm["dtype"], "--enforce-eager",
            "--max-model-len", str(llm["max_model_len"]), "--max-num-seqs", str(llm["max_num_seqs"]),
            "--max-num-batched-tokens", str(llm["max_num_batched_tokens"]), "--block-size", str(llm["block_size"]),
            "--kv-cache-memory-bytes", str(llm["kv_cache_memory_bytes"]), "--seed", str(llm["seed"]),
            "--enable-prompt-tokens-details"]
    args.append("--enable-prefix-caching" if llm["enable_prefix_caching"] else "--no-enable-prefix-caching")
    if llm.get("kv_transfer_config"):
        args += ["--kv-transfer-config", json.dumps(llm["kv_transfer_config"])]
    if llm.get("kv_events_config"):
        args += ["--kv-events-config", json.dumps(llm["kv_events_config"])]
    return args


class Child:
    """A child process in its own session, its output in `log`."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = int(args[args.index("--port") + 1])
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                         start_new_session=True)

    def wait_up(self, timeout_s: float, any_status: bool = False) -> None:
        """Until GET /health answers 200 (any HTTP status with `any_status`: a proxy whose backend is down)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited (rc {self.proc.returncode}); log {self.log}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                if any_status:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} ({self.url}) did not come up within {timeout_s} s; log {self.log}")

    def kill(self) -> None:
        """SIGKILL the whole group, as a host that dies."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


class Server(Child):
    """One vLLM OpenAI server."""

    def ttft_sum(self) -> tuple[float, float]:
        """(sum, count) of the server's TTFT histogram, over all its label sets."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(TTFT_METRIC + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(TTFT_METRIC + "_count"):
                count += float(line.rsplit(" ", 1)[1])
        return total, count

    def ttft_of(self, send: Any, required: bool = True) -> tuple[Any, float | None]:
        """(send()'s result, the TTFT the server recorded for the one request send() made); None
        where it recorded none and not `required` (a request the proxy gave up on was aborted)."""
        before, n = self.ttft_sum()
        result = send()
        deadline = time.monotonic() + 30
        while True:  # the server records a request's stats right after answering it
            after, m = self.ttft_sum()
            if m >= n + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if m == n and not required:
            return result, None
        if m != n + 1:
            raise RuntimeError(f"{self.name}: expected one more TTFT sample, got {m - n}")
        return result, after - before

    def complete(self, model: str, ids: list[int], **extra: Any) -> tuple[dict[str, Any], float]:
        """(answer, server-side TTFT) of one request; an error answer raises."""
        (status, answer, _), ttft = self._ttft_of(lambda: post(self.url + "/v1/completions",
                                                             completion(model, ids, **extra)))
        if status != 200:
            raise RuntimeError(f"{self.name} answered {status}: {str(answer)[:400]}")
        return answer, ttft

    def _ttft_of(self, send: Any) -> tuple[Any, float]:
        result, ttft = self.ttft_of(send)
        assert ttft is not None
        return result, ttft


def proxy_args(prefill_url: str, decode_url: str, port: int, prefill_timeout_s: float) -> list[str]:
    return [sys.executable, "-m", "kvtier", "proxy", "--prefill", prefill_url, "--decode", decode_url,
            "--port", str(port), "--prefill-timeout", str(prefill_timeout_s)]


def routing_proxy_args(instances: list[str], block_size: int, port: int) -> list[str]:
    """`kvtier proxy` in its routing mode (bench/vllm_routing.py); `instances` as --instance takes them
    (URL=EVENTS[=REPLAY])."""
    args = [sys.executable, "-m", "kvtier", "proxy", "--block-size", str(block_size), "--port", str(port)]
    for inst in instances:
        args += ["--instance", inst]
    return args
