"""`kvtier bench vllm`: time to first token of vLLM (CPU) with and without kvtier's connector.

One random-weight Llama (float32, ~50M parameters; built once under the cache folder) and
the same requests in every run. Each run is one vLLM engine in a subprocess
(kvtier.connectors.vllm.runner, since only connectors/ import vLLM); requests are sent one
at a time with max_tokens=1, so each call's wall time is its TTFT.

Workload 1, long-document questions (like LMCache's long-doc QA): D documents of L tokens,
a warm-up round asking one question per document (not measured), then Q measured rounds
asking a new question per document, documents in turn, so vLLM's small KV memory has
evicted a document before it is asked about again.
  apc_small    vLLM alone, KV memory for ~1.5 documents (smaller than the working set)
  apc_ample    vLLM alone, KV memory for every document (the bound: infinite HBM)
  kvtier_dram  as apc_small + kvtier, DRAM tier larger than the working set
  kvtier_disk  as apc_small + kvtier, DRAM tier for one document; the disk tier's files are
               dropped from the page cache before every request, so hits come from disk. Checked:
               `disk_device_read_bytes` is what the store service (`kvtier serve`, where disk
               hits are read) read from a block device over the measured rounds, against
               `disk_loaded_bytes`; a warning when it is under a tenth (the work folder, under
               $TMPDIR, is on tmpfs, or dropping the page cache did nothing: the hits read RAM)
  kvtier_disk_slow  as kvtier_disk with the disk's reads capped at SLOW_DISK_GBPS (the store's
               `disk.read_throttle_gbps` testing aid), far slower than recomputing: the load
               planner must recompute those hits, so its TTFT stays near apc_small's ("never
               slower than recomputing"; `planner` in the JSON: the ratio and the disk tokens
               loaded, which should be 0)
Workload 2, exact repeats: R long prompts (tails after their last whole block spread
evenly over 1..block tokens), then the same R prompts again, P times (measured).
ExampleConnector loads the whole blocks before the prompt's last token and recomputes the
tail (on average half a block); kvtier also stored each prompt's partial last chunk
(partial_chunks, on by default) and loads every token but the last. Both runs use one
engine config, with its own (smaller) block size; vLLM's KV memory holds about one prompt,
so only a connector can hit.
  example_repeat  vLLM + ExampleConnector (the only case it can hit; safetensors files per layer)
  kvtier_repeat   vLLM + kvtier (DRAM tier through the host service), store chunks of
                  repeat_chunk tokens (Sizes; 32 = one block)
  details.repeat_floor  vLLM alone with KV memory for every prompt: its own cache hits the
                  same whole blocks and nothing is loaded; what is left is the tail's
                  recompute and the engine's own time, the floor of a block-aligned hit
                  (kvtier, which recomputes only the last token, can go below it)
`--workload qa` or `--workload repeat` runs one workload only (for quick iteration).

JSON: {run: {"mean_ttft_s", "p50_ttft_s", "p90_ttft_s", "total_s", "hit_tokens_by_tier"}} (the disk
runs add "disk_device_read_bytes", "disk_loaded_bytes" and "disk_read_from_device") plus
"details" (sizes, engine init times, the first-token check against apc_small wherever the
top-2 logprob gap exceeds 1e-3, the counter cross-checks). hit_tokens_by_tier counts only
measured counters over the measured phases: "vllm_prefix_cache" is vLLM's own
vllm:prefix_cache_hits, a connector's tokens are vllm:external_prefix_cache_hits, split by
tier with kvtier's scheduler counters (loaded_tokens_by_tier); a run without them fails. The
cross-checks compare the requests' num_cached_tokens with vLLM's two counters, and kvtier's
tiers with vLLM's external hits. Environment: VLLM_CPU_NUM_OF_RESERVED_CPU=1 keeps a core
for the EngineCore and kvtier's threads.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvtier.bench.common import device_read_bytes, print_table, read_from_device, write_json
from kvtier.core.config import default_cache_dir

GAP = 1e-3
SLOW_DISK_GBPS = 0.002  # kvtier_disk_slow's disk: 2 MB/s, hundreds of times slower than the CPU's prefill
PLANNER_TARGET = 1.2  # kvtier_disk_slow's p50 TTFT at most this times apc_small's


@dataclass(slots=True, frozen=True)
class Sizes:
    hidden: int = 512
    layers: int = 12
    heads: int = 8
    intermediate: int = 1536
    vocab: int = 8192
    block: int = 128
    docs: int = 4
    doc_tokens: int = 2048
    question_tokens: int = 32
    rounds: int = 2  # measured question rounds after the warm-up round
    repeat_prompts: int = 3
    repeat_tokens: int = 8000  # longest repeat prompt (the model has 8192 positions)
    repeat_block: int = 32  # engine block size of workload 2 (the CPU backend's smallest)
    # kvtier's store chunk in workload 2, a divisor of repeat_block. Before partial chunks, 8 let
    # hits end inside a block (at most 7 tail tokens recomputed instead of up to 31), but each
    # loaded layer is then copied twice (store -> staging -> strided into the CPU pages):
    # measured, 8 gave a mean TTFT of 0.40 s where 32 gave 0.15 s. With the prompt's partial
    # chunk stored, 32 recomputes only the last token anyway.
    repeat_chunk: int = 32
    repeat_passes: int = 2  # measured passes over the repeat prompts

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.hidden * 4  # K and V, every KV head (no GQA), float32

    @property
    def max_model_len(self) -> int:
        return self.doc_tokens + self.question_tokens + 128

    @property
    def repeat_model_len(self) -> int:
        return self.repeat_tokens + self.repeat_block


QUICK = Sizes(hidden=256, layers=4, heads=4, intermediate=768, vocab=4096, block=64, docs=3, doc_tokens=512,
              question_tokens=32, rounds=1, repeat_prompts=3, repeat_tokens=512, repeat_passes=1)


def build_model(sizes: Sizes, folder: Path) -> Path:
    tag = f"llama-h{sizes.hidden}-l{sizes.layers}-v{sizes.vocab}"
    path = folder / tag
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                      num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                      num_key_value_heads=sizes.heads, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    tmp = folder / (tag + ".tmp")
    LlamaForCausalLM(cfg).float().save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


def workloads(sizes: Sizes) -> tuple[list[list[int]], list[list[list[int]]], list[list[int]]]:
    """(warm-up prompts, measured rounds, exact-repeat prompts)."""
    rng = random.Random(7)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, sizes.vocab) for _ in range(n)]

    docs = [toks(sizes.doc_tokens) for _ in range(sizes.docs)]
    warm = [d + toks(sizes.question_tokens) for d in docs]
    rounds = [[d + toks(sizes.question_tokens) for d in docs] for _ in range(sizes.rounds)]
    repeats = [toks(n) for n in repeat_lengths(sizes)]
    return warm, rounds, repeats


def repeat_lengths(sizes: Sizes) -> list[int]:
    """Workload 2's prompt lengths: the last block below repeat_tokens, plus a tail of 1..block
    tokens spread evenly over the prompts (mean tail = half a block, as for random lengths),
    so neither a lucky nor an unlucky draw decides how much both connectors recompute."""
    block, n = sizes.repeat_block, sizes.repeat_prompts
    base = (sizes.repeat_tokens - block) // block * block
    return [base + 1 + int((k + 0.5) * block / n) for k in range(n)]


def _llm_kwargs(model: Path, sizes: Sizes, kv_tokens: int, prefix_caching: bool = True,
                kv_transfer_config: dict[str, Any] | None = None, repeats: bool = False) -> dict[str, Any]:
    """Engine arguments; `repeats`: workload 2's block size and model length."""
    max_len = sizes.repeat_model_len if repeats else sizes.max_model_len
    return {"model": str(model), "skip_tokenizer_init": True, "dtype": "float32", "enforce_eager": True,
            "max_model_len": max_len, "max_num_seqs": 4, "max_num_batched_tokens": max_len,
            "block_size": sizes.repeat_block if repeats else sizes.block,
            "kv_cache_memory_bytes": kv_tokens * sizes.kv_bytes_per_token,
            "enable_prefix_caching": prefix_caching, "kv_transfer_config": kv_transfer_config,
            "disable_log_stats": False, "seed": 0}  # the runner reads vLLM's prefix-cache counters


def _kvtier_config(socket_path: str, dram_bytes: int, disk_root: str | None, stats_path: str,
                   chunk_tokens: int | None = None, disk_gbps: float = 0.0) -> dict[str, Any]:
    store: dict[str, Any] = {"memory": {"capacity_bytes": dram_bytes}}
    if chunk_tokens is not None:
        store["chunk_tokens"] = chunk_tokens
    if disk_root:
        store["disk"] = {"root": disk_root, "read_throttle_gbps": disk_gbps}
    return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"socket_path": socket_path, "store": store, "stats_path": stats_path,
                                          "connect_timeout_s": 120}}


def _service_pid(socket_path: str) -> int | None:
    """The pid of the `kvtier serve` running on `socket_path` (its lock file holds it), if any."""
    try:
        return int(Path(socket_path + ".lock").read_text().strip())
    except (OSError, ValueError):
        return None


class ServiceDeviceReads:
    """Bytes the store service of a run read from a block device over its measured phases.

    The engine's connector starts the service (`kvtier serve`), and its disk hits are read
    there, so the engine's own counters say nothing about them: this reads the service's
    /proc/<pid>/io read_bytes when the warm-up ends and again after the run. The runner reads a
    phase's stats_path when the phase ends, so the warm-up's stats_path is `fifo` (a named
    pipe): the runner's open of it waits until a thread here has read the counter, between the
    warm-up's last request and the first measured one, and the thread then passes on the
    scheduler's stats file (`stats_path`) unchanged.
    """

    def __init__(self, socket_path: str, stats_path: str, fifo: Path) -> None:
        self.socket_path, self.stats_path, self.fifo = socket_path, stats_path, fifo
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        self.before: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._at_warmup_end, name="kvtier-bench-reads", daemon=True)
        self._thread.start()

    def _service_reads(self) -> int | None:
        pid = _service_pid(self.socket_path)
        try:
            return None if pid is None else device_read_bytes(pid)
        except (OSError, RuntimeError):  # gone, or no /proc/<pid>/io here
            return None

    def _at_warmup_end(self) -> None:
        while not self._stopped.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: the runner has not opened it yet
                    raise
                self._stopped.wait(0.02)
                continue
            self.before = self._service_reads()
            try:
                data = Path(self.stats_path).read_bytes()
            except OSError:
                data = b""  # the runner fails on it, as it would on the missing file
            os.set_blocking(fd, True)
            try:
                with os.fdopen(fd, "wb") as f:  # closing it ends the runner's read
                    f.write(data)
            except BrokenPipeError:  # the runner is gone; its run reports why
                pass
            return

    def stop(self) -> int | None:
        """Bytes read since the warm-up ended (call it after the run, before the service stops);
        None where the warm-up never ended or the service's pid or counter could not be read."""
        after = self._service_reads()
        self._stopped.set()
        self._thread.join()
        self.fifo.unlink(missing_ok=True)
        return None if self.before is None or after is None else after - self.before


def _stop_service(socket_path: str) -> None:
    pid = _service_pid(socket_path)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except OSError:
            pass
    for suffix in (".lock", ".service.json", ".log"):
        try:
            os.unlink(socket_path + suffix)
        except OSError:
            pass


def _run_engine(name: str, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, "-m", "kvtier.connectors.vllm.runner", str(spec_path), str(out_path)],
                           stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    if r.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"vLLM run {name} failed (rc {r.returncode}); log {log_path}:\n{tail}")
    out = json.loads(out_path.read_text())
    out["wall_s"] = time.perf_counter() - t0
    print(f"  {name}: engine init {out['init_s']:.0f} s, run {out['wall_s']:.0f} s", flush=True)
    return out


def _summary(rows: list[dict[str, Any]], by_tier: dict[str, int]) -> dict[str, Any]:
    ttfts = sorted(r["ttft_s"] for r in rows)
    p90 = ttfts[max(0, math.ceil(0.9 * len(ttfts)) - 1)]  # nearest rank
    return {"mean_ttft_s": statistics.fmean(ttfts), "p50_ttft_s": statistics.median(ttfts), "p90_ttft_s": p90,
            "total_s": sum(ttfts), "hit_tokens_by_tier": by_tier}


def _phase(out: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in out["phases"] if p["name"] == name)


class MissingCountersError(RuntimeError):
    """A run's output lacks the counters its hit tokens are counted from."""


def _counter_delta(run: str, out: dict[str, Any], first: str, last: str, name: str) -> int:
    values = []
    for phase in (first, last):
        counters = _phase(out, phase).get("vllm_counters")
        if not counters or name not in counters:
            raise MissingCountersError(f"vLLM run {run}, phase {phase}: vLLM reported no {name} counter "
                                       f"(engine started with disable_log_stats=False?); its hits cannot be counted")
        values.append(counters[name])
    return int(values[1] - values[0])


def _tier_tokens(run: str, out: dict[str, Any], first: str, last: str) -> dict[str, int]:
    stats = [_phase(out, phase).get("stats") or {} for phase in (first, last)]
    if any("loaded_tokens_by_tier" not in s for s in stats):
        raise MissingCountersError(f"vLLM run {run}: kvtier's scheduler counters (loaded_tokens_by_tier) are missing "
                                   f"at phase {first} or {last}; its hits cannot be counted")
    before, after = stats[0]["loaded_tokens_by_tier"], stats[1]["loaded_tokens_by_tier"]
    return {f"kvtier_{t}": n - before.get(t, 0) for t, n in after.items() if n - before.get(t, 0)}


def hit_tokens(run: str, out: dict[str, Any], first: str, last: str, connector: str | None,
               checks: dict[str, Any]) -> dict[str, int]:
    """Hit tokens of the phases after `first` up to `last`, by where they came from, all from
    measured counters: vLLM's own prefix cache, and the connector's tokens (kvtier's by tier).
    Records in `checks[run]` whether the requests' num_cached_tokens equal vLLM's two counters
    and, for kvtier, whether its tiers add up to vLLM's external hits."""
    names = [p["name"] for p in out["phases"]]
    window = names[names.index(first) + 1:names.index(last) + 1]
    cached = sum(r["cached"] for name in window for r in _phase(out, name)["requests"])
    local = _counter_delta(run, out, first, last, "vllm:prefix_cache_hits")
    external = _counter_delta(run, out, first, last, "vllm:external_prefix_cache_hits")
    by_source = {"vllm_prefix_cache": local}
    check: dict[str, Any] = {"requests_cached": cached, "vllm_hits": local, "vllm_external_hits": external,
                             "cached_matches_counters": cached == local + external}
    if connector == "kvtier":
        tiers = _tier_tokens(run, out, first, last)
        by_source.update(tiers)
        check["kvtier_tier_tokens"] = sum(tiers.values())
        check["kvtier_matches_external"] = sum(tiers.values()) == external
    elif connector is not None:
        by_source[connector] = external
    elif external:
        check["unexpected_external_hits"] = external
    checks[run] = check
    return by_source


def counter_mismatches(checks: dict[str, Any]) -> list[str]:
    """The runs whose counters disagree with each other (printed and kept in the JSON)."""
    return [run for run, c in checks.items()
            if not c["cached_matches_counters"] or not c.get("kvtier_matches_external", True)
            or c.get("unexpected_external_hits")]


def planner_summary(slow: dict[str, Any], recompute: dict[str, Any], out: dict[str, Any],
                    measured: list[str]) -> dict[str, Any]:
    """kvtier_disk_slow against apc_small (vLLM recomputing everything, same engine config, same
    requests and statistic): the ratios, the disk tokens loaded in the measured rounds and the
    chunks the planner chose to recompute (kvtier's scheduler counter over the measured rounds)."""
    stats = [_phase(out, name).get("stats") or {} for name in ("warmup", measured[-1])]
    recomputed = int(stats[1].get("planner_recomputed_chunks", 0)) - int(stats[0].get("planner_recomputed_chunks", 0))
    p50 = slow["p50_ttft_s"] / recompute["p50_ttft_s"]
    disk = int(slow["hit_tokens_by_tier"].get("kvtier_disk", 0))
    return {"p50_ratio": p50, "mean_ratio": slow["mean_ttft_s"] / recompute["mean_ttft_s"],
            "disk_tokens_loaded": disk, "planner_recomputed_chunks": recomputed,
            "disk_read_gbps_cap": SLOW_DISK_GBPS, "target_p50_ratio": PLANNER_TARGET,
            "met": p50 <= PLANNER_TARGET and disk == 0,
            "measures": "kvtier_disk_slow's TTFT over apc_small's (vLLM alone recomputing), same requests"}


def disk_reads(device_bytes: int | None, summary: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """A disk run's check that its disk hits read a block device: the bytes its service read from
    one over the measured rounds (ServiceDeviceReads), the bytes its disk hits loaded (kvtier's
    disk-tier hit tokens times the KV bytes of a token), and read_from_device's verdict."""
    loaded = int(summary["hit_tokens_by_tier"].get("kvtier_disk", 0)) * sizes.kv_bytes_per_token
    return {"disk_device_read_bytes": device_bytes, "disk_loaded_bytes": loaded,
            "disk_read_from_device": read_from_device(device_bytes, loaded)}


def disk_read_lines(run: str, entry: dict[str, Any], folder: Path) -> list[str]:
    """What a disk run's check prints: one line, and a warning when its hits read RAM."""
    device, loaded = entry["disk_device_read_bytes"], entry["disk_loaded_bytes"]
    if device is None:
        return [f"{run}: disk hits loaded {loaded} bytes; what the store service read from a block device is "
                "unknown (no pid in its lock file, or no /proc/<pid>/io)"]
    lines = [f"{run}: disk hits loaded {loaded} bytes; the store service read {device} bytes from a block device "
             "over the measured rounds"]
    if entry["disk_read_from_device"] is False:
        lines.append(f"  warning: {run}'s disk hits read {device} bytes from a block device for {loaded} loaded: "
                     f"the disk tier's folder {folder} is on tmpfs, or dropping its page cache did nothing; those "
                     "hits read RAM (set TMPDIR to a folder on a real disk)")
    return lines


def first_token_check(ref: list[dict[str, Any]], rows: list[dict[str, Any]], checks: dict[str, int]) -> None:
    """Count first-token mismatches where the reference's top-2 gap exceeds GAP; the two runs must
    have answered the same requests (strict: a missing request is an error, not a shorter check)."""
    for a, b in zip(ref, rows, strict=True):
        if a["gap"] is not None and a["gap"] > GAP:
            checks["checked"] += 1
            checks["mismatches"] += a["token"] != b["token"]


WORKLOADS = ("all", "qa", "repeat")


def run_vllm_bench(json_out: str | None, quick: bool = False, workload: str = "all") -> dict[str, Any]:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    sizes = QUICK if quick else Sizes()
    cache = default_cache_dir() / "bench-vllm"
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(sizes, cache)
    warm, rounds, repeats = workloads(sizes)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    per_doc = sizes.max_model_len
    small_kv = int(1.5 * per_doc)
    ample_kv = int((sizes.docs + 1) * per_doc * 1.25)
    doc_bytes = sizes.doc_tokens * sizes.kv_bytes_per_token
    timeout = 900.0
    w1: list[dict[str, Any]] = [{"name": "warmup", "prompts": warm, "measure": False}] + [
        {"name": f"round{i}", "prompts": r} for i, r in enumerate(rounds)]
    w2: list[dict[str, Any]] = [{"name": "repeat_first", "prompts": repeats, "measure": False},
                                {"name": "repeat", "prompts": repeats * sizes.repeat_passes}]
    repeat_kv = int(1.25 * sizes.repeat_model_len)  # about one prompt: vLLM's own cache cannot keep them
    repeat_bytes = sum(len(p) for p in repeats) * sizes.kv_bytes_per_token
    outs: dict[str, dict[str, Any]] = {}
    print(f"kvtier bench vllm: workload 1: {sizes.docs} docs x {sizes.doc_tokens} tokens, block {sizes.block}, "
          f"{sizes.rounds} measured rounds; workload 2: {sizes.repeat_prompts} prompts of "
          f"{min(map(len, repeats))}-{max(map(len, repeats))} tokens, block {sizes.repeat_block} "
          f"(kvtier chunks of {sizes.repeat_chunk} tokens), {sizes.repeat_passes} measured passes; "
          f"work folder {work}", flush=True)
    try:
        if workload in ("all", "qa"):
            outs["apc_small"] = _run_engine("apc_small", {"llm": _llm_kwargs(model, sizes, small_kv), "phases": w1},
                                            work, timeout)
            outs["apc_ample"] = _run_engine("apc_ample", {"llm": _llm_kwargs(model, sizes, ample_kv), "phases": w1},
                                            work, timeout)
            sock = f"/tmp/kvtier-bench-{os.getpid()}-dram.sock"
            stats = str(work / "kvtier_dram.stats.json")
            kcfg = _kvtier_config(sock, 2 * (sizes.docs + 1) * doc_bytes, None, stats)
            phases = [dict(p, stats_path=stats) for p in w1]
            try:
                outs["kvtier_dram"] = _run_engine(
                    "kvtier_dram", {"llm": _llm_kwargs(model, sizes, small_kv, kv_transfer_config=kcfg),
                                    "phases": phases}, work, timeout)
            finally:
                _stop_service(sock)
            for run, gbps in (("kvtier_disk", 0.0), ("kvtier_disk_slow", SLOW_DISK_GBPS)):
                sock = f"/tmp/kvtier-bench-{os.getpid()}-{run}.sock"
                stats = str(work / f"{run}.stats.json")
                disk_root = work / "disk"
                shutil.rmtree(disk_root, ignore_errors=True)
                kcfg = _kvtier_config(sock, int(1.2 * doc_bytes), str(disk_root), stats, disk_gbps=gbps)
                reads = ServiceDeviceReads(sock, stats, work / f"{run}.warmup-stats.fifo")
                phases = [dict(p, stats_path=stats, drop_cache_dir=str(disk_root)) for p in w1]
                phases[0]["stats_path"] = str(reads.fifo)  # the measured rounds' reads start when it is read
                try:
                    outs[run] = _run_engine(
                        run, {"llm": _llm_kwargs(model, sizes, small_kv, kv_transfer_config=kcfg),
                              "phases": phases}, work, timeout)
                finally:
                    device = reads.stop()
                    _stop_service(sock)
                outs[run]["disk_device_read_bytes"] = device
        if workload in ("all", "repeat"):
            example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(work / "example")}}
            outs["example_repeat"] = _run_engine(
                "example_repeat", {"llm": _llm_kwargs(model, sizes, repeat_kv, kv_transfer_config=example,
                                                      repeats=True), "phases": w2}, work, timeout)
            shutil.rmtree(work / "example", ignore_errors=True)
            floor_kv = int(1.25 * (sizes.repeat_prompts + 1) * sizes.repeat_model_len)
            outs["repeat_floor"] = _run_engine(
                "repeat_floor", {"llm": _llm_kwargs(model, sizes, floor_kv, repeats=True), "phases": w2}, work, timeout)
            sock = f"/tmp/kvtier-bench-{os.getpid()}-repeat.sock"
            stats = str(work / "kvtier_repeat.stats.json")
            kcfg = _kvtier_config(sock, int(1.5 * repeat_bytes), None, stats, sizes.repeat_chunk)
            try:
                outs["kvtier_repeat"] = _run_engine(
                    "kvtier_repeat", {"llm": _llm_kwargs(model, sizes, repeat_kv, kv_transfer_config=kcfg,
                                                         repeats=True),
                                      "phases": [dict(p, stats_path=stats) for p in w2]}, work, timeout)
            finally:
                _stop_service(sock)
    finally:
        shutil.rmtree(work / "disk", ignore_errors=True)
        shutil.rmtree(work / "example", ignore_errors=True)
    return _report(outs, sizes, json_out, work, [len(p) for p in repeats])


def _report(outs: dict[str, dict[str, Any]], sizes: Sizes, json_out: str | None, work: Path,
            repeat_lengths: list[int]) -> dict[str, Any]:
    measured = [f"round{i}" for i in range(sizes.rounds)]
    result: dict[str, Any] = {}

    def w1_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
        return [r for name in measured for r in _phase(out, name)["requests"]]

    counter_checks: dict[str, Any] = {}
    for run in ("apc_small", "apc_ample", "kvtier_dram", "kvtier_disk", "kvtier_disk_slow"):
        if run not in outs:
            continue
        out = outs[run]
        connector = "kvtier" if run.startswith("kvtier") else None
        result[run] = _summary(w1_rows(out), hit_tokens(run, out, "warmup", measured[-1], connector, counter_checks))
        if "disk_device_read_bytes" in out:
            result[run].update(disk_reads(out["disk_device_read_bytes"], result[run], sizes))
    floor = None
    for run, connector in (("example_repeat", "example_connector"), ("repeat_floor", None), ("kvtier_repeat", "kvtier")):
        if run not in outs:
            continue
        rep = _phase(outs[run], "repeat")["requests"]
        summary = _summary(rep, hit_tokens(run, outs[run], "repeat_first", "repeat", connector, counter_checks))
        if run == "repeat_floor":
            floor = summary
        else:
            result[run] = summary

    # each run against vLLM alone (apc_small; repeat_floor, vLLM with no connector, for the repeats)
    checks = {"checked": 0, "mismatches": 0}
    per_run: dict[str, dict[str, Any]] = {}
    pairs: list[tuple[str, str, list[str]]] = [(run, "apc_small", ["warmup", *measured])
                                               for run in ("apc_ample", "kvtier_dram", "kvtier_disk",
                                                           "kvtier_disk_slow")]
    pairs += [(run, "repeat_floor", ["repeat_first", "repeat"]) for run in ("kvtier_repeat", "example_repeat")]
    for run, ref_run, names in pairs:
        if run not in outs or ref_run not in outs:
            continue
        ref = [r for name in names for r in _phase(outs[ref_run], name)["requests"]]
        rows = [r for name in names for r in _phase(outs[run], name)["requests"]]
        one = {"checked": 0, "mismatches": 0}
        first_token_check(ref, rows, one)
        per_run[run] = {"reference": ref_run, **one}
        checks["checked"] += one["checked"]
        checks["mismatches"] += one["mismatches"]
    mismatched = [run for run, c in per_run.items() if c["mismatches"]]
    workload = {
        "qa": f"{sizes.docs} documents x {sizes.doc_tokens} tokens + {sizes.question_tokens}-token questions, "
              f"block {sizes.block}, {sizes.rounds} measured rounds",
        "repeat": f"{sizes.repeat_prompts} prompts of {min(repeat_lengths)}-{max(repeat_lengths)} tokens "
                  f"(lengths {repeat_lengths}), block {sizes.repeat_block}, vLLM KV memory for "
                  f"{int(1.25 * sizes.repeat_model_len)} tokens, {sizes.repeat_passes} measured passes, "
                  f"same engine config for both connectors; kvtier stores chunks of {sizes.repeat_chunk} tokens "
                  f"and each prompt's partial last chunk (it recomputes the last token, ExampleConnector the "
                  f"1..{sizes.repeat_block} tokens after the last whole block before it)"}
    if "kvtier_disk_slow" in result and "apc_small" in result:
        result["planner"] = planner_summary(result["kvtier_disk_slow"], result["apc_small"],
                                            outs["kvtier_disk_slow"], measured)
    result["details"] = {"sizes": asdict(sizes), "workload": workload, "repeat_floor": floor,
                         "kvtier_repeat_chunk_tokens": sizes.repeat_chunk,
                         "init_s": {k: v["init_s"] for k, v in outs.items()},
                         "first_token_check": checks, "first_token_checks": per_run,
                         "first_token_mismatch_runs": mismatched, "counter_checks": counter_checks,
                         "counter_mismatches": counter_mismatches(counter_checks), "work_folder": str(work)}
    rows_t = [[k, v["mean_ttft_s"], v["p50_ttft_s"], v["p90_ttft_s"], v["total_s"], json.dumps(v["hit_tokens_by_tier"])]
              for k, v in result.items() if k not in ("details", "planner")]
    if floor is not None:
        rows_t.append(["(repeat_floor)", floor["mean_ttft_s"], floor["p50_ttft_s"], floor["p90_ttft_s"], floor["total_s"],
                       json.dumps(floor["hit_tokens_by_tier"])])
    print_table("vLLM TTFT (s)", ["run", "mean", "p50", "p90", "total", "hit tokens"], rows_t)
    for name, text in workload.items():
        print(f"workload {name}: {text}")
    print(f"first-token check: {checks['mismatches']} mismatches of {checks['checked']} (gap > {GAP})")
    for run in mismatched:
        c = per_run[run]
        print(f"FIRST-TOKEN MISMATCH in {run}: {c['mismatches']} of {c['checked']} against {c['reference']}")
    print("hit tokens: vLLM's counters (vllm:prefix_cache_hits, vllm:external_prefix_cache_hits) and kvtier's "
          "per-tier counters over the measured phases")
    if "planner" in result:
        p = result["planner"]
        print(f"never slower than recomputing (disk reads capped at {SLOW_DISK_GBPS} GB/s): kvtier_disk_slow / "
              f"apc_small p50 TTFT {p['p50_ratio']:.2f}x (mean {p['mean_ratio']:.2f}x; target <= {PLANNER_TARGET}), "
              f"disk tokens loaded {p['disk_tokens_loaded']}, chunks the planner recomputed "
              f"{p['planner_recomputed_chunks']}: {'met' if p['met'] else 'NOT met'}")
    for run in result["details"]["counter_mismatches"]:
        print(f"COUNTER MISMATCH in {run}: {json.dumps(counter_checks[run])}")
    for run, entry in result.items():
        if "disk_device_read_bytes" in entry:
            for line in disk_read_lines(run, entry, work / "disk"):
                print(line)
    write_json(json_out, result)
    return result
