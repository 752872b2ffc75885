"""A test-made kvtier service that answers with what a test tells it (a hostile or broken
server), so the client's checks can be exercised: slots outside the pool, bad pools."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from kvtier.service import protocol as p
from tests.conftest import CHUNK, TINY

CHUNK_BYTES = TINY.chunk_bytes(CHUNK)

Answer = Callable[[dict[str, Any]], dict[str, Any]]


class FakeServer:
    """Serves one client at a time on `socket_path`; `answers[op](msg)` builds each reply
    (id and ok are added). The pool is a file of `slots` chunks, mode `pool_mode`."""

    def __init__(self, socket_path: str, folder: str, answers: dict[str, Answer], slots: int = 4,
                 pool_mode: int = 0o600, pool_owner: int | None = None) -> None:
        self.socket_path = socket_path
        self.pool_bytes = slots * CHUNK_BYTES
        self.pool_path = os.path.join(folder, "fake-pool")
        fd = os.open(self.pool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, self.pool_bytes)
        os.fchmod(fd, pool_mode)
        if pool_owner is not None:
            os.fchown(fd, pool_owner, -1)
        self.pool_fd = fd
        self.answers = {"hello": self._hello, **answers}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.ops: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"version": p.PROTOCOL_VERSION, "pid": os.getpid(), "layout": dataclasses.asdict(TINY),
                "chunk_tokens": CHUNK, "hash_mode": "sha256", "key_bytes": 32, "pool_bytes": self.pool_bytes,
                "num_slots": self.pool_bytes // CHUNK_BYTES, "chunk_bytes": CHUNK_BYTES, "verify_reads": True}

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                while not self._stop.is_set():
                    try:
                        msg = p.recv_message(conn, 5.0, 0.2)
                    except TimeoutError:
                        continue
                    except (OSError, p.ProtocolError):
                        break
                    if msg is None:
                        break
                    op = msg.get("op")
                    self.ops.append(str(op))
                    answer = self.answers.get(str(op))
                    reply = answer(msg) if answer else {}
                    reply.update(id=msg.get("id"), ok=True)
                    try:
                        p.send_message(conn, reply, [self.pool_fd] if op == "hello" else None)
                    except OSError:
                        break

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)
        os.close(self.pool_fd)
