"""ServiceClient: the StoreClient of an engine process talking to the host's `kvtier serve`.

Control messages go over the service's Unix socket (kvtier.service.protocol), one batched
message per call; payloads are copied by this process directly between its buffers and
the service's shared-memory pool (numpy copies, checksums verified here on loads).

Trust: before sending anything the client checks, with SO_PEERCRED, that the process
answering on the socket runs as this user, root, or the owner of the socket's folder when
no one else can write there (shm.trusted_server_uids); the pool arrives as a descriptor
with the hello reply, owned by that uid, and every slot the service sends is checked
against the pool's size before a byte is copied. A server that sends anything else is
cut off with a ProtocolError, never followed.

A load is load_begin (the service pins each chunk in DRAM, promoting disk hits, and
returns slot indices and checksums), the copies, then load_end (unpin). A save is
allocate (slots reserved; keys already stored get none and are skipped), the copies into
those slots, then commit (the service publishes in chain order and writes disk in the
background; SaveResult.on_disk counts what was on disk at commit; a later commit's errors
and `flush()` report this client's disk writes that failed). If this process dies, the
service returns its leases, pins and slots; if it only stops, they expire after the
lease bound (lease_timeout_s), and this client stops trusting them before that (`_trusted_for`).

Faults: a request the service does not answer within request_timeout_s, or a lost
connection, marks the service down: lookups then miss, loads report every chunk failed,
saves put their chunks in SaveResult.errors (never half-written data published), and the
client reconnects with back-off (0.1 s doubling to 5 s) on a later call. The service frees a
dropped connection's slots and pins at once, so the operations begun on it end there too: a
save copies nothing more, a load whose copies ran past the drop counts as failed. An operation
begun before the service restarted finishes as failed: its slots belong to the old pool.

Auto-start: with `auto_start` and no service answering, the client runs
`python -m kvtier.service --config <service_config> --socket <socket_path> --all-cpus` in a new
session, free of this process's CPU affinity (its log goes to `<socket_path>.log`), and
waits up to connect_timeout_s for it.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvtier.client.api import (
    BorrowedChunks,
    LayeredLoad,
    LookupReply,
    NothingBorrowed,
    SaveSession,
    StoreClient,
    check_keys,
    check_lease_ids,
    check_save_args,
    dest_arrays,
)
from kvtier.core.codec import checksum_at
from kvtier.core.config import ClientConfig
from kvtier.core.errors import KVTierError, LayoutMismatchError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.service import protocol as p
from kvtier.service.shm import (
    close_quietly,
    default_socket_path,
    map_pool_fd,
    open_beside,
    prepare_socket_dir,
    trusted_server_uids,
)
from kvtier.store.tiered import LoadResult, SaveResult
from kvtier.store.transfer import TransferEngine, TransferHandle
from kvtier.tiers.base import Buffer, TierWriteError, as_bytes_view, buffer_address, copy_memory
from kvtier.tiers.pool import PoolRegion, PoolWatcher, PoolWatchers

log = logging.getLogger("kvtier.client")

_RETRY_FIRST_S = 0.1  # reconnect back-off: first wait, doubled per failed attempt ...
_RETRY_MAX_S = 5.0  # ... up to this


class UntrustedServiceError(p.ServiceError):
    """The process answering on the socket is not one this client may talk to."""

    def __init__(self, message: str) -> None:
        super().__init__("untrusted", message)


class _Session:
    """One connection to the service and the pool it handed over on it.

    Replaced when the service restarts. An operation begun on a session (a load's pins, a
    save's slots) finishes on it or not at all: its slots mean nothing in another pool. A
    dropped session's mapping is left to the garbage collector, since a transfer thread may
    still be copying from it (into memory no one else uses any more).

    When the socket closes the service returns at once what the connection held (drop_owner):
    a save's slots may go to another client's save while a save begun here still has layers
    to write. So copies into the pool pass a gate (begin_copy/end_copy) that close() shuts
    before it closes the socket, and a load's copies count only if they ended before
    closed_at."""

    __slots__ = ("sock", "mm", "pool", "pool_addr", "pool_bytes", "num_slots", "service_pid", "closed_at",
                 "_gate", "_copying")

    def __init__(self, sock: socket.socket, mm: mmap.mmap, pool_bytes: int, chunk_bytes: int,
                 service_pid: int) -> None:
        self.sock = sock
        self.mm = mm
        self.pool = np.frombuffer(mm, dtype=np.uint8)
        self.pool_addr = int(self.pool.ctypes.data)  # valid while self.pool lives
        self.pool_bytes = pool_bytes
        self.num_slots = pool_bytes // chunk_bytes
        self.service_pid = service_pid
        self.closed_at: float | None = None  # time.monotonic() when close() began
        self._gate = threading.Condition()  # guards closed_at and _copying
        self._copying = 0  # copies into the pool under way

    def region(self) -> PoolRegion:
        return PoolRegion(self.pool_addr, self.pool_bytes)

    def begin_copy(self) -> bool:
        """Whether a copy into the pool may start (pair with end_copy): False once closing."""
        with self._gate:
            if self.closed_at is not None:
                return False
            self._copying += 1
            return True

    def end_copy(self) -> None:
        with self._gate:
            self._copying -= 1
            if not self._copying:
                self._gate.notify_all()

    def close(self) -> None:
        """Refuse new copies into the pool, wait for those under way (bounded memcpys, made
        without any lock of the client's), then close the socket, which frees the slots."""
        with self._gate:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
            while self._copying:
                self._gate.wait()
        self.sock.close()

    def check_slots(self, slots: object, n: int, what: str) -> list[int]:
        """The service's slot list for n chunks, each -1 or inside this session's pool."""
        if not isinstance(slots, list) or len(slots) != n:
            raise p.ProtocolError(f"the service's {what} reply has no slot list for {n} chunks", fatal=True)
        if not slots or (set(map(type, slots)) <= {int} and min(slots) >= -1 and max(slots) < self.num_slots):
            return slots  # checked in C-speed passes; the loop below only names the bad slot
        for i, slot in enumerate(slots):
            if isinstance(slot, bool) or not isinstance(slot, int) or not -1 <= slot < self.num_slots:
                raise p.ProtocolError(f"the service sent slot {slot!r} for chunk {i} of a {what}, outside its "
                                      f"pool of {self.num_slots} slots", fatal=True)
        return slots


def _trusted_for(hold_s: float) -> float:
    """How long after asking this client uses pins or slots the service holds for `hold_s`.

    Counted from before the request was sent, so it ends before the service's hold does; the
    margin (half the hold, at most 5 s) covers a client stopped between its check of the time
    and the copy that follows it (a copy into slots the service already gave to another save
    would corrupt that save)."""
    return hold_s - min(hold_s / 2, 5.0)


def _hold_in(reply: dict[str, Any], what: str) -> float:
    """The seconds a reply says the service holds its pins or slots; ProtocolError if it names none."""
    hold = reply.get("hold_s")
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not hold > 0:
        raise p.ProtocolError(f"the service's {what} reply names no hold time", fatal=True)
    return float(hold)


def _all_failed(n: int) -> LoadResult:
    return LoadResult(0, tuple(range(n)), ("",) * n)


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
        self._server_uids = trusted_server_uids(self.socket_path)  # refuses a planted private folder
        self._lock = threading.Lock()  # one request in flight on the connection
        self._req_ids = itertools.count(1)
        self._closed = False
        self._retry_at = 0.0
        self._backoff = _RETRY_FIRST_S
        self.reconnects = 0
        self._session: _Session | None = None
        self._pool_watchers = PoolWatchers()  # told of each session's pool mapping (GPU page-locking)
        first = self._connect()
        info = self._hello(first, layout)
        self._layout: KVLayout = info["layout"]
        self._chunk_tokens: int = info["chunk_tokens"]
        self._hash_mode: str = info["hash_mode"]
        self._key_bytes: int = info["key_bytes"]
        self._chunk_bytes: int = info["chunk_bytes"]
        self._layer_bytes = self._layout.layer_bytes(self._chunk_tokens)
        self._verify: bool = info["verify_reads"]
        self._session = self._map(first, info)
        self._io = TransferEngine(config.transfer_threads, "kvtier-client", config.transfer_cpus)
        self._verify_io: TransferEngine | None = None  # borrowed chunks' checksum threads, started on first use

    @property
    def service_pid(self) -> int:
        s = self._session
        return s.service_pid if s is not None else -1

    # -- connection --------------------------------------------------------------------
    def _try_connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.config.request_timeout_s)
        try:
            s.connect(self.socket_path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        except BaseException:
            s.close()
            raise

    def _connect(self) -> socket.socket:
        s = self._try_connect()
        if s is not None:
            return s
        if not self.config.auto_start:
            raise TierUnavailableError(
                f"no kvtier service answers on {self.socket_path}; start one with "
                "`kvtier serve --config FILE` or set client.auto_start")
        prepare_socket_dir(self.socket_path)  # the log goes beside the socket, in its (private) folder
        log_fd = open_beside(self.socket_path + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            subprocess.Popen(
                [sys.executable, "-m", "kvtier.service", "--config", self.config.service_config,
                 "--socket", self.socket_path, "--all-cpus"],
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True)
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + self.config.connect_timeout_s
        while time.monotonic() < deadline:
            s = self._try_connect()
            if s is not None:
                return s
            time.sleep(0.05)
        raise TierUnavailableError(
            f"started a kvtier service for {self.socket_path} but it did not answer within "
            f"{self.config.connect_timeout_s} s; see {self.socket_path}.log")

    def _check_peer(self, sock: socket.socket) -> int:
        """The uid of the process answering on the socket, if this client may talk to it."""
        pid, uid, _gid = p.peer_credentials(sock)
        if uid not in self._server_uids:
            raise UntrustedServiceError(
                f"the process answering on {self.socket_path} (pid {pid}) runs as uid {uid}, not as this user, "
                f"root, or the owner of the socket's folder; refusing to send it anything")
        return uid

    def _hello(self, sock: socket.socket, layout: KVLayout | None) -> dict[str, Any]:
        """Check the peer, say hello, and return what the service announced (checked), with
        the pool's descriptor under "pool_fd" (the caller maps or closes it)."""
        try:
            server_uid = self._check_peer(sock)  # before sending anything
            req_id = next(self._req_ids)
            timeout = self.config.request_timeout_s
            sock.settimeout(timeout)
            sock.sendall(p.encode({"op": "hello", "id": req_id}))
            try:
                reply, fds = p.recv_message_with_fds(sock, timeout, timeout, p.MAX_FDS)
            except TimeoutError:
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} did not answer within "
                                           f"{timeout} s") from None
            try:
                if reply is None:
                    raise TierUnavailableError(f"the kvtier service on {self.socket_path} closed the connection")
                self._check_reply(reply, req_id)
                info = self._check_hello(reply, layout)
                if len(fds) != 1:
                    raise p.ProtocolError("the service's hello reply carried no pool descriptor", fatal=True)
                info["pool_fd"], fds = fds[0], []
                info["server_uid"] = server_uid
                return info
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            sock.close()
            raise

    def _check_hello(self, r: dict[str, Any], layout: KVLayout | None) -> dict[str, Any]:
        try:
            found = KVLayout(**r["layout"])
            info = {"layout": found, "chunk_tokens": r["chunk_tokens"], "hash_mode": r["hash_mode"],
                    "key_bytes": r["key_bytes"], "chunk_bytes": r["chunk_bytes"], "pool_bytes": r["pool_bytes"],
                    "verify_reads": bool(r["verify_reads"]), "pid": r["pid"]}
            ints_ok = all(isinstance(info[k], int) and not isinstance(info[k], bool) and info[k] > 0
                          for k in ("chunk_tokens", "key_bytes", "chunk_bytes", "pool_bytes", "pid"))
        except (KeyError, TypeError, ValueError, KVTierError) as e:
            raise p.ProtocolError(f"the service's hello reply is malformed: {e}", fatal=True) from None
        if not ints_ok or not isinstance(info["hash_mode"], str):
            raise p.ProtocolError("the service's hello reply is malformed", fatal=True)
        ct = info["chunk_tokens"]
        if info["chunk_bytes"] != found.chunk_bytes(ct) or found.layer_bytes(ct) * found.num_layers != found.chunk_bytes(ct):
            raise p.ProtocolError(f"the service announced {info['chunk_bytes']}-byte chunks; its layout has "
                                  f"{found.chunk_bytes(ct)}", fatal=True)
        if info["pool_bytes"] < info["chunk_bytes"]:
            raise p.ProtocolError("the service announced a pool smaller than one chunk", fatal=True)
        if layout is not None and layout != found:
            raise LayoutMismatchError(f"the service on {self.socket_path} stores {found}, not {layout}")
        if self._session is not None or hasattr(self, "_layout"):  # a reconnect: the same store, or none
            same = (found, ct, info["hash_mode"]) == (self._layout, self._chunk_tokens, self._hash_mode)
            if not same:
                raise LayoutMismatchError(f"the service on {self.socket_path} came back with layout {found}, "
                                          f"chunk_tokens {ct}, hash mode {info['hash_mode']}: not the store this "
                                          "client was opened on")
        return info

    def _map(self, sock: socket.socket, info: dict[str, Any]) -> _Session:
        fd = info.pop("pool_fd")
        try:
            mm = map_pool_fd(fd, info["pool_bytes"], {info["server_uid"]})
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)
        return _Session(sock, mm, info["pool_bytes"], info["chunk_bytes"], info["pid"])

    def _current(self) -> _Session:
        """The live session, reconnecting when the back-off allows (holding _lock)."""
        if self._session is not None:
            return self._session
        now = time.monotonic()
        if now < self._retry_at:
            raise TierUnavailableError(f"the kvtier service on {self.socket_path} is unavailable; "
                                       f"reconnecting in {self._retry_at - now:.1f} s")
        try:
            sock = self._try_connect()
            if sock is None:
                raise TierUnavailableError(f"no kvtier service answers on {self.socket_path}")
            session = self._map(sock, self._hello(sock, None))
        except (OSError, KVTierError) as e:
            self._set_down()
            raise TierUnavailableError(f"the kvtier service on {self.socket_path} is unavailable: {e}") from None
        self._session = session
        self._pool_watchers.mapped(session.region())
        self._backoff = _RETRY_FIRST_S
        self.reconnects += 1
        log.warning("kvtier: reconnected to the service on %s (pid %d)", self.socket_path, session.service_pid)
        return session

    def _set_down(self, session: _Session | None = None, reason: str = "") -> None:
        """Drop `session` (holding _lock) and schedule the next reconnect attempt."""
        if session is not None:
            session.close()  # the service returns whatever this connection held
            if self._session is session:
                self._session = None
                self._pool_watchers.unmapped(session.region())
                log.warning("kvtier: store unavailable: the service on %s %s; lookups miss and saves are "
                            "dropped until it is back (reconnecting with back-off)", self.socket_path,
                            reason or "was cut off")
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _RETRY_MAX_S)

    def _check_reply(self, reply: dict[str, Any], req_id: int) -> None:
        if not reply.get("ok"):
            kind, message = str(reply.get("kind", "error")), str(reply.get("error", "request failed"))
            if kind == "lease":
                raise p.LeaseError(message)
            if kind == "flush_timeout":
                raise p.FlushTimeoutError(f"kvtier service on {self.socket_path}: {message}")
            if kind == "stopping":  # it ends this connection next: down, as when it is gone
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} is stopping: {message}")
            raise p.ServiceError(kind, message)
        if reply.get("id") != req_id:
            raise p.ProtocolError(f"reply to request {reply.get('id')} while waiting for {req_id}", fatal=True)

    def _request(self, op: str, session: _Session | None = None, timeout: float | None = None,
                 **fields: Any) -> tuple[_Session, dict[str, Any]]:
        """Send one request and return (the session it went on, the reply).

        With `session`, the request must go on that connection (the rest of an operation
        begun there). TierUnavailableError when the service is down, does not answer within
        the timeout (request_timeout_s) or the connection is lost; ServiceError when the
        service refuses the request."""
        with self._lock:
            if self._closed:
                raise TierUnavailableError("the service client is closed")
            s = self._current()
            if session is not None and s is not session:
                raise TierUnavailableError(f"the connection {op} belongs to was lost (the service restarted)")
            req_id = next(self._req_ids)
            limit = timeout or self.config.request_timeout_s
            try:
                s.sock.settimeout(limit)
                s.sock.sendall(p.encode({"op": op, "id": req_id, **fields}))
                reply = p.recv_message(s.sock, limit, limit)
            except TimeoutError:
                self._set_down(s, f"did not answer {op} within {limit} s")  # a late reply would answer the wrong request
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} did not answer {op} "
                                           f"within {limit} s") from None
            except (OSError, p.ProtocolError) as e:
                self._set_down(s, f"went away ({e})")
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} went away: {e}") from None
            if reply is None:
                self._set_down(s, "closed the connection")
                raise TierUnavailableError(f"the kvtier service on {self.socket_path} closed the connection")
            try:
                self._check_reply(reply, req_id)
            except p.ProtocolError as e:
                self._set_down(s, f"sent a reply out of turn ({e})")
                raise
        return s, reply

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self._request(op, **fields)[1]

    def _distrust(self, session: _Session) -> None:
        """The service sent something impossible (a slot outside its pool): cut it off."""
        with self._lock:
            self._set_down(session, "sent an impossible reply (cut off)")

    def _check_keys(self, keys: Sequence[bytes], name: str = "keys") -> list[bytes]:
        return check_keys(keys, self._key_bytes, self._hash_mode, name)

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
        """Leading hits; a miss (0 hits) while the service is down or does not answer."""
        keys = self._check_keys(keys)
        try:
            r = self._call("lookup", keys=keys, lease=lease, lease_s=self.config.lease_timeout_s)
        except TierUnavailableError as e:
            log.debug("kvtier: lookup is a miss: %s", e)
            return LookupReply(0, (), None)
        hits, tiers, lease_id = r.get("hits"), r.get("tiers"), r.get("lease")
        if (not isinstance(hits, int) or not 0 <= hits <= len(keys) or not isinstance(tiers, list)
                or len(tiers) != hits or not set(map(type, tiers)) <= {str}
                or not (lease_id is None or isinstance(lease_id, int))):
            raise p.ProtocolError("the service's lookup reply is malformed", fatal=True)
        return LookupReply(hits, tuple(tiers), lease_id)

    def release(self, lease_id: int) -> None:
        self._lease_op("release", lease_id)

    def trim(self, lease_id: int, keys: Sequence[bytes]) -> None:
        self._lease_op("trim", lease_id, keys=self._check_keys(keys))

    def renew(self, lease_ids: Sequence[int]) -> list[int]:
        """The leases still held, renewed; none while the service is down (the leases went with its
        connection). A service older than this client refuses the op: ServiceError("unknown_op")."""
        ids = check_lease_ids(lease_ids)
        if not ids:
            return []
        try:
            r = self._call("renew_leases", leases=ids, lease_s=self.config.lease_timeout_s)
        except TierUnavailableError as e:
            log.debug("kvtier: no lease renewed: %s", e)
            return []
        renewed = r.get("renewed")
        if not isinstance(renewed, list) or not set(renewed) <= set(ids):
            raise p.ProtocolError("the service's renew_leases reply is malformed", fatal=True)
        return renewed

    def _lease_op(self, op: str, lease_id: int, **fields: Any) -> None:
        try:
            self._call(op, lease=lease_id, **fields)
        except TierUnavailableError as e:  # its pins went with the service's connection
            raise p.LeaseError(f"lease {lease_id} is not held: {e}") from None

    def load(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]], layers: Sequence[int] | None = None,
             lease_id: int | None = None) -> TransferHandle[LoadResult]:
        keys = self._check_keys(keys)
        layer_list, arrays = dest_arrays(self._layout, self._chunk_tokens, keys, dests, layers)
        return self._io.submit("load", self._load_now, keys, arrays, layer_list, lease_id)

    def _begin_load(self, keys: list[bytes], lease_id: int | None) -> tuple[_Session, dict[str, Any], float] | None:
        """load_begin, checked: (session, reply, trust_until), or None while the service is down."""
        asked = time.monotonic()
        try:
            s, r = self._request("load_begin", keys=keys, lease=lease_id, hold_s=self.config.lease_timeout_s,
                                 wait_s=self.config.request_timeout_s / 2)  # promotions past it: failed chunks
        except TierUnavailableError as e:
            log.debug("kvtier: load failed: %s", e)
            return None
        try:
            s.check_slots(r.get("slots"), len(keys), "load")
            tiers, sums = r.get("tiers"), r.get("checksums")
            if not isinstance(tiers, list) or len(tiers) != len(keys) or not isinstance(sums, list) or len(sums) != len(keys):
                raise p.ProtocolError("the service's load reply is malformed", fatal=True)
            n_layers = self._layout.num_layers
            if any(slot >= 0 and (type(c) is not list or len(c) != n_layers) for slot, c in zip(r["slots"], sums)):
                raise p.ProtocolError("the service's load reply has no checksum per layer", fatal=True)
            hold = _hold_in(r, "load")
        except p.ProtocolError:
            self._distrust(s)
            raise
        return s, r, asked + _trusted_for(min(hold, self.config.lease_timeout_s))

    def _end_load(self, s: _Session, load_id: object, corrupt: list[int], trust_until: float) -> bool:
        """load_end; False when the copies cannot be trusted (the pins may have expired meanwhile,
        or ended with the connection, which another request may have dropped during the copies)."""
        copied = time.monotonic()
        in_time = copied < trust_until
        try:
            self._request("load_end", session=s, load=load_id, corrupt=corrupt)
        except TierUnavailableError:
            # the pins lasted until the connection closed: the copies stand if they ended before
            # that (as they did when it was this load_end that timed out)
            closed_at = s.closed_at
            return in_time and (closed_at is None or closed_at > copied)
        except p.ServiceError as e:
            if e.kind == "unknown_load":
                return False  # expired on the service: the slots may have been reused during the copies
            raise
        return in_time

    def _load_now(self, keys: list[bytes], dests: list[list[np.ndarray]], layers: list[int],
                  lease_id: int | None) -> LoadResult:
        begun = self._begin_load(keys, lease_id)
        if begun is None:
            return _all_failed(len(keys))
        s, r, trust_until = begun
        slots, found, sums = r["slots"], r["tiers"], r["checksums"]
        pool, cb, lb = s.pool, self._chunk_bytes, self._layer_bytes
        failed: list[int] = []
        corrupt: list[int] = []
        trusted = False
        try:
            for i, slot in enumerate(slots):
                if slot < 0:
                    failed.append(i)
                    continue
                base = slot * cb
                for layer, dest in zip(layers, dests[i], strict=False):
                    off = base + layer * lb
                    copy_out_of_pool(dest, pool[off:off + lb])
                    if self._verify and checksum_at(dest.ctypes.data, lb) != sums[i][layer]:
                        corrupt.append(i)
                        failed.append(i)
                        break
        finally:
            trusted = self._end_load(s, r.get("load"), corrupt, trust_until)
        if not trusted:
            log.warning("kvtier: a load outlived its pins (%d chunks); they count as failed", len(keys))
            return _all_failed(len(keys))
        tiers = tuple("" if i in failed else str(t) for i, t in enumerate(found))
        return LoadResult(failed[0] if failed else len(keys), tuple(failed), tiers)

    def load_layers(self, keys: Sequence[bytes], dests: Sequence[Sequence[Buffer]],
                    lease_id: int | None = None) -> LayeredLoad:
        keys = self._check_keys(keys)
        layers, arrays = dest_arrays(self._layout, self._chunk_tokens, keys, dests, None)
        return _LayeredLoad(self, keys, arrays, layers, lease_id)

    def begin_save(self, keys: Sequence[bytes], parent: bytes, first_depth: int) -> SaveSession:
        keys = self._check_keys(keys)
        self._check_keys([parent], "parent")
        check_save_args(self._layout, keys, first_depth)
        return _ServiceSave(self, keys, parent, first_depth)

    def save(self, keys: Sequence[bytes], parent: bytes, first_depth: int,
             srcs: Sequence[Sequence[Buffer]]) -> TransferHandle[SaveResult]:
        keys = self._check_keys(keys)
        self._check_keys([parent], "parent")
        check_save_args(self._layout, keys, first_depth, srcs)
        batch = _ServiceSave(self, keys, parent, first_depth)
        try:
            for layer in range(self._layout.num_layers):
                batch.write_layer(layer, [s[layer] for s in srcs])
        except BaseException:
            batch.abort()
            raise
        return batch.commit()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait, at most `timeout_s` (None: protocol.MAX_FLUSH_S), until the service's disk writes
        queued so far, this client's saves' among them, have ended; as wait_lower, the service
        waits that long and this client waits for its answer request_timeout_s longer.
        TierWriteError naming this client's writes that failed (not yet reported in a SaveResult);
        FlushTimeoutError when writes were still running at the bound (they go on, and a later
        flush or commit reports those that fail); TierUnavailableError while the service is down."""
        bound = p.MAX_FLUSH_S if timeout_s is None else timeout_s
        if not 0 <= bound <= p.MAX_FLUSH_S:  # NaN too
            raise ValueError(f"timeout_s must be within 0..{p.MAX_FLUSH_S} s, got {timeout_s!r}")
        r = self._call("flush", timeout_s=float(bound), timeout=bound + self.config.request_timeout_s)
        errors = r.get("errors") or []
        if errors:
            raise TierWriteError(f"kvtier service: {len(errors)} disk write(s) of this client's saves failed: "
                                 + "; ".join(str(e) for e in errors[:3]))

    def wait_lower(self, keys: Sequence[bytes], timeout_s: float) -> int:
        """The service waits (on this connection) for the chunks' lower-tier writes; this client
        waits for its answer request_timeout_s longer. TierUnavailableError while it is down."""
        keys = self._check_keys(keys)
        if not 0 <= timeout_s <= p.MAX_WAIT_LOWER_S:  # NaN too
            raise ValueError(f"timeout_s must be within 0..{p.MAX_WAIT_LOWER_S} s, got {timeout_s!r}")
        r = self._call("wait_lower", keys=keys, timeout_s=float(timeout_s),
                       timeout=timeout_s + self.config.request_timeout_s)
        pending = r.get("pending")
        if isinstance(pending, bool) or not isinstance(pending, int) or not 0 <= pending <= len(keys):
            raise p.ProtocolError("the service's wait_lower reply is malformed", fatal=True)
        return pending

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats")["stats"])

    def watch_pool(self, watcher: PoolWatcher) -> None:
        """The shared-memory pool of the live session (a reconnect maps a new one: told again)."""
        with self._lock:
            session = self._session
            self._pool_watchers.add(watcher, session.region() if session is not None else None)

    def lendable_pool(self) -> PoolRegion | None:
        session = self._session
        return session.region() if session is not None else None

    def borrow(self, keys: Sequence[bytes], lease_id: int | None = None) -> BorrowedChunks:
        """load_begin without the copies: the service pins the chunks in the shared pool and this
        client's caller reads their slots in place (a GPU worker's copies out of the page-locked
        mapping); end() is load_end, with the chunks verify() found corrupt."""
        keys = self._check_keys(keys)
        begun = self._begin_load(keys, lease_id)
        if begun is None:  # the service is down: every chunk is recomputed
            return NothingBorrowed(len(keys))
        return _ServiceBorrow(self, *begun)

    def _verify_engine(self) -> TransferEngine:
        with self._lock:
            if self._verify_io is None:
                threads = max(self.config.transfer_threads, min(8, os.cpu_count() or 1))
                self._verify_io = TransferEngine(threads, "kvtier-client-verify", self.config.transfer_cpus)
            return self._verify_io

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session, self._session = self._session, None
            if session is not None:
                session.close()  # the service returns whatever this client still held
                self._pool_watchers.unmapped(session.region())
        self._io.shutdown()
        if self._verify_io is not None:
            self._verify_io.shutdown()
        if session is not None:
            del session.pool
            close_quietly(session.mm)


class _ServiceBorrow(BorrowedChunks):
    """Chunks the service pinned for this client (load_begin) and the caller reads in place."""

    def __init__(self, client: ServiceClient, session: _Session, reply: dict[str, Any], trust_until: float) -> None:
        self._c = client
        self._session = session
        self._reply = reply
        self._trust_until = trust_until
        self.pool = session.pool
        self.slots = list(reply["slots"])
        self._sums: list[list[int]] = reply["checksums"]
        self._corrupt: list[int] = []
        self._lock = threading.Lock()
        self._ended = False

    def verify(self, first: int, last: int) -> TransferHandle[LoadResult]:
        c = self._c
        if not 0 <= first <= last <= len(self.slots):
            raise ValueError(f"chunks {first}..{last - 1} outside 0..{len(self.slots) - 1}")

        def run() -> LoadResult:
            cb, lb, n_layers = c._chunk_bytes, c._layer_bytes, c._layout.num_layers
            failed: list[int] = []
            tiers: list[str] = []
            for i in range(first, last):
                slot = self.slots[i]
                ok = slot >= 0
                if ok and c._verify:  # on verify threads: checksum_at lets go of the GIL
                    at = self._session.pool_addr + slot * cb
                    ok = all(checksum_at(at + j * lb, lb) == self._sums[i][j] for j in range(n_layers))
                    if not ok:
                        with self._lock:
                            self._corrupt.append(i)
                if not ok:
                    failed.append(i - first)
                tiers.append(str(self._reply["tiers"][i]) if ok else "")
            return LoadResult(failed[0] if failed else last - first, tuple(failed), tuple(tiers))

        return c._verify_engine().submit("verify", run)

    def end(self) -> bool:
        if self._ended:
            return True
        self._ended = True
        with self._lock:
            corrupt = sorted(self._corrupt)
        trusted = self._c._end_load(self._session, self._reply.get("load"), corrupt, self._trust_until)
        if not trusted:
            log.warning("kvtier: a direct load outlived its pins (%d chunks); they count as failed", len(self.slots))
        return trusted


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
        self._session: _Session | None = None
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
            begun = c._begin_load(self._keys, lease_id)
        except BaseException:
            self._stop()
            raise
        if begun is None:  # the service is down: every chunk is recomputed
            self._stop()
            return _all_failed(len(self._keys))
        s, r, trust_until = begun
        with self._cond:
            self._session = s
            self._slots, self._sums = r["slots"], r["checksums"]
            self._bad = {i for i, slot in enumerate(self._slots) if slot < 0}
            self._begun = True
            self._cond.notify_all()
        trusted = False
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
            trusted = c._end_load(s, r.get("load"), self._corrupt, trust_until)
        if not trusted:
            log.warning("kvtier: a load outlived its pins (%d chunks); they count as failed", len(self._keys))
            return _all_failed(len(self._keys))
        failed = sorted(self._bad)
        tiers = tuple("" if i in self._bad else str(t) for i, t in enumerate(r["tiers"]))
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
        assert self._session is not None  # set before _begun
        layer, lb = self._layers[j], c._layer_bytes
        dest = self._dests[i][j]
        off = self._slots[i] * c._chunk_bytes + layer * lb
        copy_out_of_pool(dest, self._session.pool[off:off + lb])
        ok = not c._verify or checksum_at(dest.ctypes.data, lb) == self._sums[i][layer]
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

    def layer_ready(self, layer: int) -> bool:
        """Whether wait_layer(layer) would return at once (lets a GPU connector queue copies early)."""
        with self._cond:
            return self._stopped or (self._begun and not self._left[self._position[layer]])

    def wait(self) -> LoadResult:
        return self._handle.wait()


class _ServiceSave:
    """A save in service mode: slots reserved at once, filled here, published by commit.

    While the service is down, or once the slots' hold is past its trusted part, nothing is
    copied and commit reports every chunk in SaveResult.errors instead of publishing."""

    def __init__(self, client: ServiceClient, keys: list[bytes], parent: bytes, first_depth: int) -> None:
        self._client = client
        self.keys = keys
        self._written: set[int] = set()
        self._done = False
        self._session: _Session | None = None
        self._save_id: object = None
        self._trust_until = 0.0
        self._renew_after = 0.0
        self._error = ""
        self.slots: list[int] = [-1] * len(keys)
        self.granted = 0
        asked = time.monotonic()
        try:
            # the service waits at most half our patience for disk writes to free slots
            s, r = client._request("allocate", keys=keys, parent=parent, first_depth=first_depth,
                                   hold_s=client.config.lease_timeout_s, wait_s=client.config.request_timeout_s / 2)
        except TierUnavailableError as e:
            self._error = str(e)
            return
        try:
            self.slots = s.check_slots(r.get("slots"), len(keys), "save")
            granted = r.get("granted")
            if isinstance(granted, bool) or not isinstance(granted, int) or not 0 <= granted <= len(keys):
                raise p.ProtocolError("the service's allocate reply is malformed", fatal=True)
            hold = _hold_in(r, "allocate")
        except p.ProtocolError:
            client._distrust(s)
            raise
        self.granted = granted
        self._session = s
        self._save_id = r.get("save")
        self._trust(asked, hold)

    def _trust(self, asked: float, hold: float) -> None:
        """Trust the slots for the trusted part of `hold` from `asked` (when the request was sent),
        and renew them once half of that has passed."""
        self._trust_until = asked + _trusted_for(min(hold, self._client.config.lease_timeout_s))
        self._renew_after = asked + (self._trust_until - asked) / 2

    def _renew(self) -> None:
        """Ask the service to hold the slots again from now: a save whose layers are written over a
        forward longer than one hold (an 8k-token prefill step on a CPU took 36 s against a 30 s
        hold, and every chunk of it was dropped) keeps its slots while it keeps writing."""
        asked = time.monotonic()
        try:
            _s, r = self._client._request("renew", session=self._session, save=self._save_id,
                                          hold_s=self._client.config.lease_timeout_s)
        except TierUnavailableError:  # the connection was set down: _usable() abandons the save
            self._trust_until = asked  # never write its slots again, whatever the cause
            return
        except p.ServiceError as e:
            if e.kind == "unknown_save":
                self._trust_until = asked  # expired on the service already: never write its slots again
            else:  # a service without renewals (an older kvtier): the first hold is all there is
                self._renew_after = self._trust_until
            return
        try:
            hold = _hold_in(r, "renew")
        except p.ProtocolError:
            assert self._session is not None
            self._client._distrust(self._session)
            raise
        self._trust(asked, hold)

    def _usable(self) -> bool:
        """Whether the reserved slots may still be written: the service holds them for twice the
        trusted time, and until this client's connection closes."""
        s = self._session
        if s is None:
            return False
        if s.closed_at is None and self._renew_after <= time.monotonic() < self._trust_until:
            self._renew()
        if s.closed_at is not None:
            self._lose()
            return False
        if time.monotonic() >= self._trust_until:
            self._error = "its reserved slots outlived their hold (the client was stalled); not saved"
            self._abandon()
            return False
        return True

    def write_layer(self, layer: int, srcs: Sequence[Buffer]) -> None:
        c = self._client
        if self._done:
            raise ValueError("write to a save batch that was committed or aborted")
        if len(srcs) != len(self.keys):
            raise ValueError(f"{len(self.keys)} chunks but {len(srcs)} layer buffers")
        if not 0 <= layer < c.layout.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{c.layout.num_layers - 1}")
        lb = c._layer_bytes
        views = [as_bytes_view(src) for src in srcs]
        for view in views:
            if view.nbytes != lb:
                raise ValueError(f"layer {layer} source has {view.nbytes} bytes, a section has {lb}")
        if self._usable():
            s = self._session
            assert s is not None
            if not s.begin_copy():  # the connection was dropped since _usable()
                self._lose()
            else:
                try:
                    for slot, view in zip(self.slots, views, strict=False):
                        if slot >= 0:
                            copy_memory(s.pool_addr + slot * c._chunk_bytes + layer * lb, buffer_address(view), lb)
                finally:
                    s.end_copy()
        self._written.add(layer)

    def commit(self, extras: Sequence[tuple[tuple[int, int, bytes], ...]] | None = None) -> TransferHandle[SaveResult]:
        c = self._client
        if self._done:
            raise ValueError("save batch already committed or aborted")
        if extras is not None and len(extras) != len(self.keys):
            self.abort()
            raise ValueError(f"{len(self.keys)} keys but {len(extras)} extras")
        missing = c.layout.num_layers - len(self._written)
        if missing:
            self.abort()
            raise ValueError(f"save: {len(self._written)} of {c.layout.num_layers} layers written")
        n = len(self.keys)
        if self._usable():
            assert self._session is not None
            self._done = True
            try:
                fields: dict[str, Any] = {} if extras is None else {
                    "extras": [[[kind, index, bytes(data)] for kind, index, data in chunk] for chunk in extras]}
                _s, r = c._request("commit", session=self._session, save=self._save_id, **fields)
            except TierUnavailableError as e:
                self._error = str(e)
            except p.ServiceError as e:
                if e.kind != "unknown_save":
                    raise
                self._error = f"its reserved slots expired on the service ({e})"
            else:
                errors = r.get("errors", [])
                result = SaveResult(r["chunks"], r["in_memory"], r["on_disk"],
                                    tuple(str(e) for e in errors) if isinstance(errors, list) else ())
                return c._io.completed("save", result)
        self._done = True
        error = f"chunks 0..{n - 1}: not saved: {self._error}"
        return c._io.completed("save", SaveResult(n, 0, 0, (error,)))

    def _lose(self) -> None:
        """The connection the slots were reserved on closed: the service returned them then and
        may have given them to another client's save, so nothing more is copied into them."""
        self._error = "the connection its slots were reserved on was lost; not saved"
        self._abandon()

    def _abandon(self) -> None:
        """Give the slots back (best effort: they expire on the service anyway)."""
        session, self._session = self._session, None
        if session is None or session.closed_at is not None:
            return  # a closed connection's slots went back when it closed
        try:
            self._client._request("abort", session=session, save=self._save_id)
        except KVTierError:
            pass

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._abandon()
