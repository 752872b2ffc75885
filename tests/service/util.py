"""Helpers that run a real `python -m kvtier.service` process for tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.client import connect
from kvtier.client.api import StoreClient
from kvtier.service.shm import shm_path_for
from tests.conftest import CHUNK, TINY, payload

LB = TINY.layer_bytes(CHUNK)
CHUNK_BYTES = TINY.chunk_bytes(CHUNK)


def short_tmpdir() -> str:
    """A short folder under /tmp (Unix socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="kvt-", dir="/tmp")
    os.chmod(d, 0o755)
    return d


def service_config(folder: str, slots: int = 32, disk: bool = False, **extra: Any) -> dict[str, Any]:
    store: dict[str, Any] = {"chunk_tokens": CHUNK, "memory": {"capacity_bytes": slots * CHUNK_BYTES}}
    if disk:
        store["disk"] = {"root": os.path.join(folder, "disk"), "capacity_bytes": 1 << 30}
    cfg = {"layout": {"num_layers": TINY.num_layers, "num_kv_heads": TINY.num_kv_heads,
                      "head_size": TINY.head_size, "dtype": TINY.dtype},
           "store": store, "socket_path": os.path.join(folder, "kv.sock"), "message_timeout_s": 1.0}
    cfg.update(extra)
    return cfg


class ServiceProcess:
    """`python -m kvtier.service --config FILE` as a child process; start() waits until it answers."""

    def __init__(self, config: dict[str, Any], folder: str) -> None:
        self.config = config
        self.socket_path = config["socket_path"]
        self.config_path = os.path.join(folder, "service.json")
        Path(self.config_path).write_text(json.dumps(config))
        self.proc: subprocess.Popen[str] | None = None
        self.shm_path = shm_path_for(self.socket_path, config.get("shm_name", ""))

    def start(self, timeout: float = 20.0) -> ServiceProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.service", "--config", self.config_path],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                return self
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        raise RuntimeError("service did not start")

    def client(self, **extra: Any) -> StoreClient:
        return connect({"mode": "service", "socket_path": self.socket_path, **extra})

    def stop(self, sig: int = signal.SIGTERM) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=30)
        return out

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def save_chain(client: StoreClient, keys: list[bytes], parent: bytes, first_depth: int = 0):
    return client.save(keys, parent, first_depth, [payload(k) for k in keys])


def new_dests(n: int, layers: int = TINY.num_layers) -> list[list[np.ndarray]]:
    return [[np.zeros(LB, np.uint8) for _ in range(layers)] for _ in range(n)]


def exact(keys: list[bytes], dests: list[list[np.ndarray]], layers: list[int] | None = None) -> bool:
    layers = list(range(TINY.num_layers)) if layers is None else layers
    return all(np.array_equal(d, payload(k)[layer]) for k, ds in zip(keys, dests, strict=True)
               for layer, d in zip(layers, ds, strict=True))


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def cleanup(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
