"""`kvtier bench service`: the host service's control-message rate and load throughput.

In one run, with a real `python -m kvtier.service` child process and this process as its
client:
- lookup_chunks_per_s: chunks looked up per second through batched lookup messages
  (every key a hit, `lookup_batch` keys per message);
- load_gbps: chunks loaded from the service's shared-memory DRAM pool into this process's
  buffers (ServiceClient.load: load_begin, numpy copies, checksum verification, load_end);
- inprocess_gbps: the same chunks loaded by an InProcessClient (a TieredStore in this
  process, same config, same verification): the same bytes copied within one process;
- load_ratio = load_gbps / inprocess_gbps; memcpy_gbps is the plain copy for reference, and
shm_memcpy_gbps / shm_section_memmove_gbps the copy out of a /dev/shm mapping in one call and
in section-sized memmoves (the latter is what loads ran at before the service client copied
with numpy's vector loop: see service_client.copy_out_of_pool).
Every pass's contents are verified after its timing (the destination is zeroed before each
pass); `verified` is true only if every pass of both clients verified, and the command exits 1
otherwise. Medians over `runs`; nothing asserts
a time. Default chunk: 12 layers x 8 KV heads x 128 dims x fp32 x 16 tokens = 1.5 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.client import InProcessClient, connect
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import TieredStore

LAYOUT = KVLayout(num_layers=12, num_kv_heads=8, head_size=128, dtype="float32")
CHUNK_TOKENS = 16


def chunk_payload(base: np.ndarray, i: int) -> np.ndarray:
    """[layers, layer_bytes] bytes of chunk i: a shared random block xor'ed per chunk, stamped."""
    out = np.bitwise_xor(base, np.uint8((i * 13 + 7) & 0xFF))
    for layer in range(out.shape[0]):
        out[layer, :8] = np.frombuffer(np.int64(i * 1000 + layer).tobytes(), np.uint8)
    return out


def verify_chain(dest: np.ndarray, base: np.ndarray, n: int) -> bool:
    return all(np.array_equal(dest[i], chunk_payload(base, i)) for i in range(n))


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtier service exited with status {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return time.perf_counter() - t0
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise RuntimeError("kvtier service did not start")


def _timed_loads(client: Any, keys: list[bytes], dest: np.ndarray, batch: int, runs: int,
                 verify: Callable[[np.ndarray], bool]) -> tuple[list[float], list[bool]]:
    """Seconds per full pass loading every key, in batches of `batch` chunks, and whether each
    pass's contents verified (checked after its timing; `dest` is zeroed before every pass so a
    pass that loads nothing cannot pass on an earlier pass's bytes)."""
    layers = dest.shape[1]
    times, verified = [], []
    for _ in range(runs):
        dest.fill(0)
        t0 = time.perf_counter()
        for s in range(0, len(keys), batch):
            part = keys[s:s + batch]
            dests = [[dest[s + i, layer] for layer in range(layers)] for i in range(len(part))]
            res = client.load(part, dests).wait()
            if res.failed:
                raise RuntimeError(f"load failed for chunks {res.failed[:5]}")
        times.append(time.perf_counter() - t0)
        verified.append(verify(dest))
    return times, verified


def start_service(folder: str, layout: KVLayout, chunk_tokens: int, pool_bytes: int,
                   metrics: bool) -> tuple[str, subprocess.Popen[bytes]]:
    """A `python -m kvtier.service` child with its socket and config in `folder`; with metrics,
    they are also served on a free port, as an operator would run it (nobody scrapes during
    the bench)."""
    sock = os.path.join(folder, "kv.sock")
    store_cfg = {"chunk_tokens": chunk_tokens, "memory": {"capacity_bytes": pool_bytes}}
    cfg: dict[str, Any] = {"layout": {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads,
                                      "head_size": layout.head_size, "dtype": layout.dtype,
                                      "planes": layout.planes},
                           "store": store_cfg, "socket_path": sock, "metrics": metrics}
    if metrics:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            cfg["metrics_port"] = probe.getsockname()[1]
    Path(folder, "service.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.service", "--config", str(Path(folder, "service.json")),
                             "--log-level", "WARNING"])
    return sock, proc


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def save_chain(client: Any, root: bytes, keys: list[bytes], base: np.ndarray) -> None:
    """Every chunk of the chain into the client's store's DRAM, 64 chunks per save."""
    for s in range(0, len(keys), 64):
        part = keys[s:s + 64]
        srcs = [list(chunk_payload(base, s + i)) for i in range(len(part))]
        parent = root if s == 0 else keys[s - 1]
        res = client.save(part, parent, s, srcs).wait()
        if res.in_memory != len(part):
            raise RuntimeError(f"save kept {res.in_memory} of {len(part)} chunks in DRAM")


def _timed_copies(dest: np.ndarray, src: np.ndarray, runs: int) -> list[float]:
    """Seconds per plain copy of `src` (filled first, so its pages exist) into `dest`."""
    src.fill(1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dest, src)
        times.append(time.perf_counter() - t0)
    return times


def _timed_section_copies(dest: np.ndarray, src: np.ndarray, section: int, runs: int) -> list[float]:
    """Seconds per copy of `src` into `dest` as `section`-byte memmoves, the size a load copies.

    glibc's memmove uses `rep movsb` at this size, which reads 4 KiB-page shared memory at about
    half the speed of private huge-page memory on some hosts (issue 16); the service client
    copies with a vector loop instead (service_client.copy_out_of_pool)."""
    import ctypes

    d, s, n = dest.ctypes.data, src.ctypes.data, src.nbytes
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for off in range(0, n, section):
            ctypes.memmove(d + off, s + off, min(section, n - off))
        times.append(time.perf_counter() - t0)
    return times


def run_service_bench(json_out: str | os.PathLike[str] | None = None, *, chunks: int = 720, runs: int = 5,
                      load_batch: int = 120, lookup_batch: int = 720, lookup_seconds: float = 1.0,
                      layout: KVLayout = LAYOUT, chunk_tokens: int = CHUNK_TOKENS,
                      metrics: bool = True) -> dict[str, Any]:
    chunk_bytes = layout.chunk_bytes(chunk_tokens)
    lb = layout.layer_bytes(chunk_tokens)
    total = chunks * chunk_bytes
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (layout.num_layers, lb), dtype=np.uint8)
    folder = tempfile.mkdtemp(prefix="kvtier-bench-", dir="/tmp")
    sock, proc = start_service(folder, layout, chunk_tokens, total, metrics)
    try:
        start_s = _wait_for_socket(sock, proc)
        svc = connect({"mode": "service", "socket_path": sock}, layout=layout)
        local = InProcessClient(TieredStore(StoreConfig(chunk_tokens=chunk_tokens,
                                                        memory=MemoryTierConfig(capacity_bytes=total)), layout))
        root = svc.namespace("bench-service").root()
        keys = svc.chunk_keys(root, list(range(chunks * chunk_tokens)))
        for client in (svc, local):  # the same chain into both stores, 64 chunks per save
            save_chain(client, root, keys, base)

        # lookups: batched messages, every key a hit
        rates = []
        for _ in range(3):
            n = 0
            t0 = time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < lookup_seconds / 3:
                for s in range(0, chunks, lookup_batch):
                    n += svc.lookup(keys[s:s + lookup_batch]).hits
            rates.append(n / elapsed)

        dest = np.empty((chunks, layout.num_layers, lb), dtype=np.uint8)
        dest.fill(0)  # fault the pages in before timing

        def verify(d: np.ndarray) -> bool:
            return verify_chain(d, base, chunks)

        svc_times, svc_ok = _timed_loads(svc, keys, dest, load_batch, runs, verify)
        local_times, local_ok = _timed_loads(local, keys, dest, load_batch, runs, verify)
        src = np.empty_like(dest)
        memcpy_times = _timed_copies(dest, src, runs)
        del src
        # The machine's limit for reading shared memory: the same copy from a /dev/shm mapping in this
        # process (on this host it runs at well under half the speed of a private array).
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(create=True, size=dest.nbytes)
        try:
            shm_src = np.ndarray(dest.shape, dtype=np.uint8, buffer=shm.buf)
            shm_times = _timed_copies(dest, shm_src, runs)
            shm_section_times = _timed_section_copies(dest, shm_src, lb, runs)
            del shm_src
        finally:
            shm.close()
            shm.unlink()
        svc.close()
        local.close()
    finally:
        stop_service(proc)
        shutil.rmtree(folder, ignore_errors=True)

    load_gbps = total / statistics.median(svc_times) / 1e9
    inprocess_gbps = total / statistics.median(local_times) / 1e9
    shm_memcpy_gbps = total / statistics.median(shm_times) / 1e9
    shm_section_gbps = total / statistics.median(shm_section_times) / 1e9
    result: dict[str, Any] = {
        "lookup_chunks_per_s": statistics.median(rates),
        "load_gbps": load_gbps,
        "inprocess_gbps": inprocess_gbps,
        "load_ratio": load_gbps / inprocess_gbps,
        "memcpy_gbps": total / statistics.median(memcpy_times) / 1e9,
        "shm_memcpy_gbps": shm_memcpy_gbps,
        "shm_section_memmove_gbps": shm_section_gbps,
        "verified": all(svc_ok) and all(local_ok),
        "verified_runs": {"service": svc_ok, "inprocess": local_ok},
        "chunk_bytes": chunk_bytes,
        "chunks": chunks,
        "bytes_per_measurement": total,
        "runs": runs,
        "load_batch": load_batch,
        "lookup_batch": lookup_batch,
        "service_start_s": start_s,
        "metrics": metrics,
    }
    print(f"kvtier service bench: {chunks} chunks of {chunk_bytes / 2**20:.2f} MiB "
          f"({total / 2**30:.2f} GiB per pass), median of {runs}; contents verified after every pass: "
          f"{result['verified']}")
    if not result["verified"]:
        print(f"  UNVERIFIED passes: service {[i for i, ok in enumerate(svc_ok) if not ok]}, "
              f"in-process {[i for i, ok in enumerate(local_ok) if not ok]}", file=sys.stderr)
    print(f"  {'lookups through the service':<34} {result['lookup_chunks_per_s']:>14,.0f} chunks/s  (target >= 100,000)")
    print(f"  {'load, service pool -> client':<34} {load_gbps:>14.2f} GB/s")
    print(f"  {'load, in-process store':<34} {inprocess_gbps:>14.2f} GB/s")
    print(f"  {'ratio service / in-process':<34} {result['load_ratio']:>14.2f}       (target >= 0.8)")
    print(f"  {'plain memcpy (reference)':<34} {result['memcpy_gbps']:>14.2f} GB/s")
    print(f"  {'memcpy out of /dev/shm (reference)':<34} {result['shm_memcpy_gbps']:>14.2f} GB/s  "
          f"(service load / this = {load_gbps / shm_memcpy_gbps:.2f})")
    print(f"  {'same, as one memmove per section':<34} {shm_section_gbps:>14.2f} GB/s  "
          f"({lb // 1024} KiB sections, the copy size of a load)")
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier bench service")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--chunks", type=int, default=720)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--metrics", choices=("on", "off"), default="on",
                        help="off: the service records no metrics (to measure what they cost)")
    args = parser.parse_args(argv)
    return exit_status(run_service_bench(args.json_out, chunks=args.chunks, runs=args.runs,
                                         metrics=args.metrics == "on"))


def exit_status(result: dict[str, Any]) -> int:
    """The command's exit status: 1 if any pass of either client failed verification."""
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
