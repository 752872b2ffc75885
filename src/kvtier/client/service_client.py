"""ServiceClient: the StoreClient of an engine process talking to the host's `kvtier serve`.

Control messages go over the service's Unix socket (kvtier.service.protocol), one batched
message per call; payloads are copied by this process directly between its buffers and
the service's shared-memory pool (numpy copies, checksums verified here on loads).

A load is load_begin (the service pins each chunk in DRAM, promoting disk hits, and
returns slot indices and checksums), the copies, then load_end (unpin). A save is
allocate (slots reserved; keys already stored get none and are skipped), the copies into
those slots, then commit (the service publishes in chain order and writes disk in the
background; SaveResult.on_disk counts what was on disk at commit, `flush()` waits for the
rest). If this process dies, the service returns its leases, pins and slots.

Auto-start: with `auto_start` and no service answering, the client runs
`python -m kvtier.service --config <service_config> --socket <socket_path> --all-cpus` in a new
session, free of this process's CPU affinity (its log goes to `<socket_path>.log`), and
waits up to connect_timeout_s for it.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.client.api import LayeredLoad, LookupReply, SaveSession, StoreClient, dest_arrays
from kvtier.core.codec import checksum
from kvtier.core.config import ClientConfig
from kvtier.core.errors import LayoutMismatchError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.service import protocol as p
from kvtier.service.shm import close_quietly, default_socket_path, open_pool
from kvtier.store.tiered import LoadResult, SaveResult
from kvtier.store.transfer import TransferEngine, TransferHandle
from kvtier.tiers.base import Buffer, as_bytes_view, buffer_address, copy_memory

_REPLY_TIMEOUT_S = 300.0  # a flush may wait for many disk writes


def copy_out_of_pool(dest: np.ndarray, section: np.ndarray) -> None:
    """Copy a pool section (uint8) into `dest` (uint8, same length) with numpy's vector loop.

    Not memmove, as the DRAM tier copies: for section-sized copies (tens of KiB up to about
    half a MiB) glibc's memmove uses `rep movsb`, and on a host whose shared memory is not
    huge-page backed (transparent_hugepage/shmem_enabled = never) that reads the pool at half
    the speed it reads private, THP-backed memory: 5.8 against 11.1 GB/s for 128 KiB
    sections on issue 16's AMD EPYC VM, where np.positive's loop reads the pool at 10.3 GB/s.
    np.positive is the identity on unsigned integers, so the bytes arrive unchanged; a
    section cut short by a bad offset fails the shape check instead of reading past the pool.
    """
    np.positive(section, out=dest)


class ServiceClient(StoreClient):
    def __init__(self, config: ClientConfig, layout: KVLayout | None = None) -> None:
        self.config = config
        self.socket_path = os.path.abspath(config.socket_path or default_socket_path())
        self._lock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._closed = False
        self._sock = self._connect()
        try:
            info = self._call("hello")
            self._layout = KVLayout(**info["layout"])
            if layout is not None and layout != self._layout:
                raise LayoutMismatchError(f"the service on {self.socket_path} stores {self._layout}, not {layout}")
            self._chunk_tokens: int = info["chunk_tokens"]
            self._hash_mode: str = info["hash_mode"]
            self.service_pid: int = info["pid"]
            self._chunk_bytes: int = info["chunk_bytes"]
            self._layer_bytes = self._layout.layer_bytes(self._chunk_tokens)
            self._verify: bool = info["verify_reads"]
            self._mm = open_pool(info["shm_path"], info["pool_bytes"])
        except BaseException:
            self._sock.close()
            raise
        self._pool = np.frombuffer(self._mm, dtype=np.uint8)
        self._pool_addr = int(self._pool.ctypes.data)  # valid while self._pool lives
        self._io = TransferEngine(config.transfer_threads, "kvtier-client", config.transfer_cpus)

    # -- connection --------------------------------------------------------------------
    def _try_connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket_path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None

    def _connect(self) -> socket.socket:
        s = self._try_connect()
        if s is not None:
            return s
        if not self.config.auto_start:
            raise TierUnavailableError(
                f"no kvtier service answers on {self.socket_path}; start one with "
                "`kvtier serve --config FILE` or set client.auto_start")
        with open(self.socket_path + ".log", "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "kvtier.service", "--config", self.config.service_config,
                 "--socket", self.socket_path, "--all-cpus"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.config.connect_timeout_s
        while time.monotonic() < deadline:
            s = self._try_connect()
            if s is not None:
                return s
            time.sleep(0.05)
        raise TierUnavailableError(
            f"started a kvtier service for {self.socket_path} but it did not answer within "
            f"{self.config.connect_timeout_s} s; see {self.socket_path}.log")

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise TierUnavailableError("the service client is closed")
            req_id = next(self._req_ids)
            try:
                self._sock.sendall(p.encode({"op": op, "id": req_id, **fields}))
                reply = p.recv_message(self._sock, _REPLY_TIMEOUT_S)
            except (OSError, p.ProtocolError) as e:
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} went away: {e}") from None
            if reply is None:
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} closed the connection")
        if not reply.get("ok"):
            kind, message = str(reply.get("kind", "error")), str(reply.get("error", "request failed"))
            raise p.LeaseError(message) if kind == "lease" else p.ServiceError(kind, message)
        if reply.get("id") != req_id:
            raise p.ProtocolError(f"reply to request {reply.get('id')} while waiting for {req_id}")
        return reply

    # -- the API -----------------------------------------------------------------------
    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    @property
    def hash_mode(self) -> str:
        return self._hash_mode

    def lookup(self, keys: Sequence[bytes], lease: bool = False) -> LookupReply:
        r = self._call("lookup", keys=list(keys), lease=lease, lease_s=self.config.lease_timeout_s)
        return LookupReply(r["hits"], tuple(r["tiers"]), r["lease"])

    def release(self, lease_id: int) -> None:
        self._call("release", lease=lease_id)

    def load(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]], layers: Sequence[int] | None = None,
             lease_id: int | None = None) -> TransferHandle[LoadResult]:
        layer_list, arrays = dest_arrays(self._layout, self._chunk_tokens, keys, dests, layers)
        return self._io.submit("load", self._load_now, list(keys), arrays, layer_list, lease_id)

    def _load_now(self, keys: list[bytes], dests: list[list[np.ndarray]], layers: list[int],
                  lease_id: int | None) -> LoadResult:
        r = self._call("load_begin", keys=keys, lease=lease_id)
        slots, found, sums = r["slots"], r["tiers"], r["checksums"]
        pool, cb, lb = self._pool, self._chunk_bytes, self._layer_bytes
        failed: list[int] = []
        corrupt: list[int] = []
        try:
            for i, slot in enumerate(slots):
                if slot < 0:
                    failed.append(i)
                    continue
                base = slot * cb
                for layer, dest in zip(layers, dests[i], strict=False):
                    off = base + layer * lb
                    copy_out_of_pool(dest, pool[off:off + lb])
                    if self._verify and checksum(dest.data) != sums[i][layer]:
                        corrupt.append(i)
                        failed.append(i)
                        break
        finally:
            self._call("load_end", load=r["load"], corrupt=corrupt)
        tiers = tuple("" if i in failed else t for i, t in enumerate(found))
        return LoadResult(failed[0] if failed else len(keys), tuple(failed), tiers)

    def load_layers(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                    lease_id: int | None = None) -> LayeredLoad:
        layers, arrays = dest_arrays(self._layout, self._chunk_tokens, keys, dests, None)
        return _LayeredLoad(self, list(keys), arrays, layers, lease_id)

    def begin_save(self, keys: Sequence[bytes], parent: bytes, first_depth: int) -> SaveSession:
        return _ServiceSave(self, list(keys), parent, first_depth)

    def save(self, keys: Sequence[bytes], parent: bytes, first_depth: int,
             srcs: Sequence[Sequence[Buffer]]) -> TransferHandle[SaveResult]:
        if len(srcs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(srcs)} source lists")
        batch = _ServiceSave(self, list(keys), parent, first_depth)
        try:
            for layer in range(self._layout.num_layers):
                batch.write_layer(layer, [s[layer] for s in srcs])
        except BaseException:
            batch.abort()
            raise
        return batch.commit()

    def flush(self) -> None:
        self._call("flush")

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats")["stats"])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()  # the service returns whatever this client still held
        self._io.shutdown()
        del self._pool
        close_quietly(self._mm)


class _LayeredLoad:
    """A load copied layer by layer by a transfer thread, which a waiting caller helps.

    The transfer thread pins every chunk once (load_begin), copies each chunk's section of
    the first layer, then of the next, and unpins once (load_end). The sections are work
    items in that order behind one cursor: a caller in wait_layer(j) whose layer is not in
    place yet takes items too, so a transfer thread that shares its core with something
    else (vLLM's engine process polls on the core it left free) never makes the caller wait
    much longer than copying the rest of the layer itself would.
    """

    def __init__(self, client: ServiceClient, keys: list[bytes], dests: list[list[np.ndarray]], layers: list[int],
                 lease_id: int | None) -> None:
        self._c = client
        self._keys = keys
        self._dests = dests
        self._layers = layers
        self._position = {layer: j for j, layer in enumerate(layers)}
        self._cond = threading.Condition()
        self._begun = False  # load_begin answered, or failed (then _stopped)
        self._stopped = False
        self._slots: list[int] = []
        self._sums: list[list[int]] = []
        self._bad: set[int] = set()  # chunks missing or corrupt
        self._corrupt: list[int] = []
        self._next = 0  # next work item: layer position * len(keys) + chunk
        self._left = [len(keys)] * len(layers)  # unfinished items per layer position
        self._handle = client._io.submit("load", self._run, lease_id)

    def _run(self, lease_id: int | None) -> LoadResult:
        c = self._c
        try:
            r = c._call("load_begin", keys=self._keys, lease=lease_id)
        except BaseException:
            self._stop()
            raise
        with self._cond:
            self._slots, self._sums = r["slots"], r["checksums"]
            self._bad = {i for i, slot in enumerate(self._slots) if slot < 0}
            self._begun = True
            self._cond.notify_all()
        try:
            while self._copy_next(len(self._layers)):
                pass
            with self._cond:
                while any(self._left):  # sections a caller is still copying
                    self._cond.wait()
        except BaseException:
            self._stop()
            raise
        finally:
            c._call("load_end", load=r["load"], corrupt=self._corrupt)
        failed = sorted(self._bad)
        tiers = tuple("" if i in self._bad else t for i, t in enumerate(r["tiers"]))
        return LoadResult(failed[0] if failed else len(self._keys), tuple(failed), tiers)

    def _stop(self) -> None:
        with self._cond:
            self._begun = self._stopped = True
            self._cond.notify_all()

    def _copy_next(self, below: int) -> bool:
        """Copy the next section if its layer position is below `below`; False if there is none."""
        n = len(self._keys)
        with self._cond:
            while True:
                item = self._next
                if self._stopped or item >= n * len(self._layers) or item // n >= below:
                    return False
                self._next = item + 1
                j, i = divmod(item, n)
                if i not in self._bad:
                    break
                self._done(j)
        c = self._c
        layer, lb = self._layers[j], c._layer_bytes
        dest = self._dests[i][j]
        off = self._slots[i] * c._chunk_bytes + layer * lb
        copy_out_of_pool(dest, c._pool[off:off + lb])
        ok = not c._verify or checksum(dest.data) == self._sums[i][layer]
        with self._cond:
            if not ok and i not in self._bad:
                self._bad.add(i)
                self._corrupt.append(i)
            self._done(j)
        return True

    def _done(self, j: int) -> None:  # holding _cond
        self._left[j] -= 1
        if not self._left[j]:
            self._cond.notify_all()

    def wait_layer(self, layer: int) -> None:
        j = self._position[layer]
        with self._cond:
            while not self._begun:
                self._cond.wait()
        while self._copy_next(j + 1):
            pass
        with self._cond:
            while self._left[j] and not self._stopped:
                self._cond.wait()

    def wait(self) -> LoadResult:
        return self._handle.wait()


class _ServiceSave:
    """A save in service mode: slots reserved at once, filled here, published by commit."""

    def __init__(self, client: ServiceClient, keys: list[bytes], parent: bytes, first_depth: int) -> None:
        self._client = client
        self.keys = keys
        r = client._call("allocate", keys=keys, parent=parent, first_depth=first_depth)
        self._save_id: int = r["save"]
        self.slots: list[int] = r["slots"]
        self.granted: int = r["granted"]
        self._written: set[int] = set()
        self._done = False

    def write_layer(self, layer: int, srcs: Sequence[Buffer]) -> None:
        c = self._client
        if self._done:
            raise ValueError("write to a save batch that was committed or aborted")
        if len(srcs) != len(self.keys):
            raise ValueError(f"{len(self.keys)} chunks but {len(srcs)} layer buffers")
        if not 0 <= layer < c.layout.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{c.layout.num_layers - 1}")
        lb = c._layer_bytes
        for slot, src in zip(self.slots, srcs, strict=False):
            view = as_bytes_view(src)
            if view.nbytes != lb:
                raise ValueError(f"layer {layer} source has {view.nbytes} bytes, a section has {lb}")
            if slot >= 0:
                off = slot * c._chunk_bytes + layer * lb
                copy_memory(c._pool_addr + off, buffer_address(view), lb)
        self._written.add(layer)

    def commit(self) -> TransferHandle[SaveResult]:
        if self._done:
            raise ValueError("save batch already committed or aborted")
        missing = self._client.layout.num_layers - len(self._written)
        if missing:
            self.abort()
            raise ValueError(f"save: {len(self._written)} of {self._client.layout.num_layers} layers written")
        self._done = True
        r = self._client._call("commit", save=self._save_id)
        result = SaveResult(r["chunks"], r["in_memory"], r["on_disk"], tuple(r["errors"]))
        return self._client._io.completed("save", result)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._client._call("abort", save=self._save_id)
