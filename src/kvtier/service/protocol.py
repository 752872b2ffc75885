"""Wire protocol between engine processes and `kvtier serve`: small batched control messages.

Framing: a 4-byte little-endian body length, then a msgpack map (never pickle). A request
is {"op": str, "id": int, ...fields}; its reply is {"id": same, "ok": true, ...} or
{"id": same, "ok": false, "kind": str, "error": str}. One request is in flight per
connection; a client that wants concurrency opens more connections.

Ops (fields -> reply fields), every key list is one message for many chunks:
    hello       {}                                  -> layout, chunk_tokens, shm_path, pool_bytes, ...
    lookup      keys, lease: bool, lease_s          -> hits, tiers, lease (id or nil)
    lease       keys, lease_s                       -> lease (error "unknown_key" if any is absent)
    release     lease                               -> {}   (error "lease" if not held)
    load_begin  keys, lease (id or nil)             -> load, slots (-1 = failed), tiers, checksums
    load_end    load, corrupt: [index]              -> {}
    allocate    keys, parent, first_depth           -> save, slots (-1 = already stored), granted
    commit      save                                -> chunks, in_memory, on_disk, errors
    abort       save                                -> {}
    flush       {}                                  -> {}   (pending disk writes done)
    stats       {}                                  -> the service's stats dict

Payload bytes never travel here: slots are indices into the shared-memory pool, and the
client copies between its buffers and `pool[slot * chunk_bytes:]` itself.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from kvtier.core.errors import KVTierError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
MAX_MESSAGE_BYTES = 16 << 20
MAX_KEY_BYTES = 64


class ServiceError(KVTierError):
    """The store service refused a request; `kind` says why (see protocol.py)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class LeaseError(ServiceError):
    """A lease id that is not held: never taken, released, expired, or its owner died."""

    def __init__(self, message: str) -> None:
        super().__init__("lease", message)


class ProtocolError(ServiceError):
    """A message that is malformed, truncated, too large or of an unknown type."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__("protocol", message)
        self.fatal = fatal  # the stream cannot be trusted any more: disconnect


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
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


def recv_message(sock: socket.socket, body_timeout: float | None = None) -> dict[str, Any] | None:
    """Read one framed message; None when the peer closed the connection between messages.

    Waits without limit for a message to start; once its first byte arrived the rest must
    come within `body_timeout` seconds (a client that stalls mid-message is cut off).
    """
    sock.settimeout(None)
    first = sock.recv(1)
    if not first:
        return None
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

def get_keys(msg: dict[str, Any], name: str = "keys") -> list[bytes]:
    keys = msg.get(name)
    if not isinstance(keys, list):
        raise ProtocolError(f"field {name!r} must be a list of keys")
    for k in keys:
        if not isinstance(k, bytes) or not 0 < len(k) <= MAX_KEY_BYTES:
            raise ProtocolError(f"field {name!r} must hold keys of 1..{MAX_KEY_BYTES} bytes")
    return keys


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


def get_bytes(msg: dict[str, Any], name: str) -> bytes:
    value = msg.get(name)
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_KEY_BYTES:
        raise ProtocolError(f"field {name!r} must be a key of 1..{MAX_KEY_BYTES} bytes")
    return value


def get_float(msg: dict[str, Any], name: str, default: float) -> float:
    value = msg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ProtocolError(f"field {name!r} must be a number")
    return float(value)


def error_reply(req_id: Any, kind: str, message: str) -> dict[str, Any]:
    return {"id": req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else 0,
            "ok": False, "kind": kind, "error": message}
