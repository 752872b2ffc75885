"""Wire protocol between engine processes and `kvtier serve`: small batched control messages.

Framing: a 4-byte little-endian body length, then a msgpack map (never pickle). A request
is {"op": str, "id": int, ...fields}; its reply is {"id": same, "ok": true, ...} or
{"id": same, "ok": false, "kind": str, "error": str}. One request is in flight per
connection; a client that wants concurrency opens more connections.

Ops (fields -> reply fields), every key list is one message for many chunks:
    hello       {}                                  -> layout, chunk_tokens, pool_bytes, ... + the pool's fd
    lookup      keys, lease: bool, lease_s          -> hits, tiers, lease (id or nil)
    lease       keys, lease_s                       -> lease (error "unknown_key" if any is absent)
    release     lease                               -> {}   (error "lease" if not held)
    trim        lease, keys                         -> dropped (pins and promotions ended); the lease
                                                       keeps its other keys (error "lease" if not held)
    renew_leases  leases: [id], lease_s             -> renewed: the ids still held, now held lease_s
                                                       from now (one not held is left out, no error)
    load_begin  keys, lease (id or nil), hold_s,    -> load, slots (-1 = failed), tiers, checksums, hold_s
                wait_s (optional: longest wait for
                promotions; later ones are failed)
    load_end    load, corrupt: [index]              -> {}   (error "unknown_load" once its hold expired)
    allocate    keys, parent, first_depth, hold_s,  -> save, slots (-1 = already stored), granted, hold_s
                wait_s (longest wait for free slots)
    renew       save, hold_s                        -> hold_s (error "unknown_save" once its hold expired):
                                                       the slots are held hold_s from now
    commit      save, extras (optional: per chunk,  -> chunks, in_memory, on_disk, errors
                a list of [kind, index, bytes]
                sections stored beside its KV)
    abort       save                                -> {}
    flush       timeout_s (optional, at most         -> errors (this client's failed disk writes); error
                MAX_FLUSH_S, the default)               "flush_timeout" when the store's disk writes were
                                                        still running after timeout_s, "stopping" when
                                                        the service began to stop meanwhile
    wait_lower  keys, timeout_s (at most             -> pending (how many of keys still had a lower-tier
                MAX_WAIT_LOWER_S)                       write running when the wait ended)
    stats       {}                                  -> the service's stats dict

Payload bytes never travel here: slots are indices into the shared-memory pool, and the
client copies between its buffers and `pool[slot * chunk_bytes:]` itself. The pool itself
reaches the client once, as a file descriptor attached to the hello reply (SCM_RIGHTS).
Keys are bytes of exactly the store's key length (its hash mode's digest size).
A load's pins and a save's reserved slots are held for `hold_s` (the client's lease bound,
capped by the service's max_lease_s) and then returned even if the client stays connected.
"""

from __future__ import annotations

import math
import os
import socket
import struct
from typing import Any

import msgpack

from kvtier.core.errors import KVTierError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
MAX_MESSAGE_BYTES = 16 << 20
MAX_CONTAINERS = 1 << 20  # arrays and maps one message may unpack into (decode)
MAX_ARRAY_LEN = 1 << 20  # a 1M-token prompt in 16-token chunks is 65,536 keys
MAX_MAP_LEN = 1 << 16
MAX_KEY_BYTES = 32  # the codec's limit (kvtier.core.codec.MAX_KEY_BYTES)
MAX_FDS = 1  # descriptors a reply may carry (the pool, with hello)
MAX_WAIT_LOWER_S = 300.0  # the longest wait_lower the service grants (a longer one is refused)
MAX_FLUSH_S = 300.0  # the longest flush the service grants, and its bound when a client names none


class ServiceError(KVTierError):
    """The store service refused a request; `kind` says why (see protocol.py)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class LeaseError(ServiceError):
    """A lease id that is not held: never taken, released, expired, or its owner died."""

    def __init__(self, message: str) -> None:
        super().__init__("lease", message)


class FlushTimeoutError(ServiceError):
    """A flush's bound passed while disk writes were still running (a slow or hung disk). They go
    on in the background; a later flush or commit reports those that fail."""

    def __init__(self, message: str) -> None:
        super().__init__("flush_timeout", message)


class ProtocolError(ServiceError):
    """A message that is malformed, truncated, too large or of an unknown type."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__("protocol", message)
        self.fatal = fatal  # the stream cannot be trusted any more: disconnect


_UCRED = struct.Struct("3i")


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED); for a
    client's connection, those of the process that made the service's socket listen."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """A message's map. A body of up to MAX_MESSAGE_BYTES cannot unpack into more than
    MAX_CONTAINERS arrays and maps, nor an array longer than MAX_ARRAY_LEN: one byte is a whole
    empty array, so 16 MiB of them would otherwise take over a GiB of Python objects."""
    left = [MAX_CONTAINERS]

    def counted(obj: Any) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise ProtocolError(f"a message holds more than {MAX_CONTAINERS} arrays and maps")
        return obj

    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, list_hook=counted, object_hook=counted,
                              max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
        raise ProtocolError(f"undecodable message: {type(e).__name__}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a msgpack map")
    return msg


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None on a clean EOF before the first byte; ProtocolError on EOF mid-way."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError(f"connection closed {got} bytes into a {n}-byte read", fatal=True)
        got += k
    return bytes(buf)


def recv_message(sock: socket.socket, body_timeout: float | None = None,
                 first_timeout: float | None = None) -> dict[str, Any] | None:
    """Read one framed message; None when the peer closed the connection between messages.

    Waits up to `first_timeout` seconds (None: without limit) for a message to start
    (TimeoutError past it); once its first byte arrived the rest must come within
    `body_timeout` seconds (a peer that stalls mid-message is cut off).
    """
    msg, _fds = recv_message_with_fds(sock, body_timeout, first_timeout, 0)
    return msg


def recv_message_with_fds(sock: socket.socket, body_timeout: float | None, first_timeout: float | None,
                          max_fds: int) -> tuple[dict[str, Any] | None, list[int]]:
    """recv_message that also collects up to `max_fds` descriptors sent with the message's
    first byte (SCM_RIGHTS); the caller owns (and must close) the descriptors returned."""
    sock.settimeout(first_timeout)
    fds: list[int] = []
    if max_fds:
        first, fds, flags, _addr = socket.recv_fds(sock, 1, max_fds)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise ProtocolError("a message carried more descriptors than expected", fatal=True)
    else:
        first = sock.recv(1)
    if not first:
        _close_all(fds)
        return None, []
    try:
        return _recv_rest(sock, first, body_timeout), fds
    except BaseException:
        _close_all(fds)
        raise


def send_message(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one framed message, with `fds` attached to its first byte (SCM_RIGHTS)."""
    data = encode(msg)
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _recv_rest(sock: socket.socket, first: bytes, body_timeout: float | None) -> dict[str, Any]:
    sock.settimeout(body_timeout)
    try:
        rest = recv_exact(sock, HEADER.size - 1)
        if rest is None:
            raise ProtocolError("connection closed inside a message header", fatal=True)
        (length,) = HEADER.unpack(first + rest)
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {length} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit", fatal=True)
        body = recv_exact(sock, length) if length else b""
        if body is None:
            raise ProtocolError("connection closed before the message body", fatal=True)
    except TimeoutError:
        raise ProtocolError(f"message not completed within {body_timeout} s", fatal=True) from None
    return decode(body)


# -- field validation (the service trusts nothing it receives) ---------------------------

def get_keys(msg: dict[str, Any], name: str = "keys", key_bytes: int | None = None) -> list[bytes]:
    """A list of keys, each bytes of exactly `key_bytes` (any 1..MAX_KEY_BYTES when None)."""
    keys = msg.get(name)
    if not isinstance(keys, list):
        raise ProtocolError(f"field {name!r} must be a list of keys")
    if not keys_are_valid(keys, key_bytes):  # the slow path only to name the bad key
        for i, k in enumerate(keys):
            check_key(k, f"{name}[{i}]", key_bytes)
    return keys


def keys_are_valid(keys: list[Any], key_bytes: int | None) -> bool:
    """Whether every key is bytes of `key_bytes` (1..MAX_KEY_BYTES when None), in C-speed passes:
    a lookup carries hundreds of keys and a per-key Python call cost a measurable share of it."""
    if not set(map(type, keys)) <= {bytes}:
        return False
    lengths = set(map(len, keys))
    if key_bytes is not None:
        return lengths <= {key_bytes}
    return not lengths or (min(lengths) > 0 and max(lengths) <= MAX_KEY_BYTES)


def check_key(key: object, name: str, key_bytes: int | None = None) -> bytes:
    """`key` if it is a key of the right type and length; ProtocolError naming `name` if not."""
    if not isinstance(key, bytes):
        raise ProtocolError(f"{name} must be bytes, got {type(key).__name__}")
    if key_bytes is not None and len(key) != key_bytes:
        raise ProtocolError(f"{name} has {len(key)} bytes; this store's keys have {key_bytes}")
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ProtocolError(f"{name} has {len(key)} bytes; a key has 1..{MAX_KEY_BYTES}")
    return key


def get_int(msg: dict[str, Any], name: str, optional: bool = False) -> int | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name!r} must be an integer")
    return value


def get_ints(msg: dict[str, Any], name: str) -> list[int]:
    value = msg.get(name, [])
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ProtocolError(f"field {name!r} must be a list of integers")
    return value


def get_bytes(msg: dict[str, Any], name: str, key_bytes: int | None = None) -> bytes:
    return check_key(msg.get(name), f"field {name!r}", key_bytes)


def get_float(msg: dict[str, Any], name: str, default: float) -> float:
    value = msg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"field {name!r} must be a finite number")
    return float(value)


def error_reply(req_id: Any, kind: str, message: str) -> dict[str, Any]:
    return {"id": req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else 0,
            "ok": False, "kind": kind, "error": message}


MAX_EXTRA_SECTIONS = 16  # optional sections one chunk may carry in a commit


def get_extras(msg: dict[str, Any], name: str = "extras") -> list[tuple[tuple[int, int, bytes], ...]] | None:
    """A commit's optional per-chunk sections: None when absent; ProtocolError when malformed
    (the host checks there is one entry per chunk)."""
    value = msg.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError(f"field {name!r} must be a list of section lists, one per chunk")
    out = []
    for i, sections in enumerate(value):
        if not isinstance(sections, list) or len(sections) > MAX_EXTRA_SECTIONS:
            raise ProtocolError(f"field {name!r}[{i}] must be a list of at most {MAX_EXTRA_SECTIONS} sections")
        chunk = []
        for section in sections:
            if (not isinstance(section, list) or len(section) != 3 or not all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 0xFFFF for x in section[:2])
                    or not isinstance(section[2], bytes) or section[0] == 1):  # 1: SECTION_KV, never an extra
                raise ProtocolError(f"field {name!r}[{i}]: each section is [kind (not 1), index, bytes]")
            chunk.append((section[0], section[1], section[2]))
        out.append(tuple(chunk))
    return out
