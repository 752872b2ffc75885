"""Content keys: a digest chained over the whole prefix of a token sequence.

key(chunk i) = H(parent key || frame(extra keys) || tokens of chunk i), where the parent
of chunk 0 is the namespace root: H(frame(scheme version, model fingerprint, layout id,
tensor-parallel rank, tenant salt, hash mode, namespace extras)). The parent has the
mode's fixed key length, the extras frame is count- and length-prefixed, and the tokens
run to the end of the message, so the encoding is injective: no token sequence can spell
an extra key or a different split into chunks.

Tokens are framed as little-endian uint32; keys are deterministic across processes,
machines and restarts (no PYTHONHASHSEED, no pickle).

Modes (registry HASH_MODES): "sha256" (default, collision-resistant, 32-byte keys),
"blake2b" (collision-resistant, 32-byte keys) and "xxh3_128" (fast, 16-byte keys,
NOT collision-resistant: only for trusted single-tenant deployments).

Engines hand tokens over as list[int] and requests grow; `KeyChain` computes each
chunk's key once and extends as tokens arrive, so a scheduler never re-hashes.

KeyChain.extend's sha256 loop runs in C (kvtier.core._chainhash, OpenSSL) when that optional
extension was built: about twice as fast as the pure-Python loop here, which stays as the
reference (tests compare the two) and as the fallback. KEY_BACKEND says which one runs, "c" or
"python"; KVTIER_PURE_PYTHON_KEYS=1 in the environment at import forces "python".
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

import xxhash

from kvtier.core.errors import ConfigError

ChunkKey = NewType("ChunkKey", bytes)

KEY_SCHEME_VERSION = 1
PARTIAL_CHUNK_MARK = b"kvtier-partial-chunk"  # the extra key that marks a partial chunk's key
_U32 = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"
assert array("I").itemsize == 4, "kvtier needs a 4-byte C unsigned int"


@dataclass(slots=True, frozen=True)
class HashMode:
    name: str
    new: Callable[[bytes], Any]  # hasher over some bytes; .digest() gives the key (C calls only)
    key_bytes: int
    collision_resistant: bool

    def digest(self, data: bytes) -> bytes:
        return self.new(data).digest()


HASH_MODES: dict[str, HashMode] = {
    "sha256": HashMode("sha256", hashlib.sha256, 32, True),
    "blake2b": HashMode("blake2b", functools.partial(hashlib.blake2b, digest_size=32), 32, True),
    "xxh3_128": HashMode("xxh3_128", xxhash.xxh3_128, 16, False),
}
DEFAULT_HASH_MODE = "sha256"


def _load_c_chain() -> Callable[[bytes, bytes, Sequence[int], int], list[bytes]] | None:
    if os.environ.get("KVTIER_PURE_PYTHON_KEYS", "") not in ("", "0"):
        return None
    try:
        from kvtier.core._chainhash import chain_sha256
    except ImportError:  # not built (no compiler or OpenSSL headers at install): pure Python
        return None
    return chain_sha256


# chain_sha256(parent, extras frame, tokens, chunk_tokens) -> keys of the full chunks, or None
_c_chain_sha256 = _load_c_chain()
KEY_BACKEND = "c" if _c_chain_sha256 is not None else "python"


def get_hash_mode(name: str) -> HashMode:
    try:
        return HASH_MODES[name]
    except KeyError:
        raise ConfigError(
            f"hash_mode {name!r} is unknown; choose one of {sorted(HASH_MODES)}"
        ) from None


def _frame(*fields: bytes) -> bytes:
    """Length-prefixed concatenation: u32 count, then (u32 length, bytes) per field."""
    parts = [_U32.pack(len(fields))]
    for f in fields:
        parts.append(_U32.pack(len(f)))
        parts.append(f)
    return b"".join(parts)


MAX_CHUNK_TOKENS = 1 << 20  # KeyChain's and StoreConfig.chunk_tokens' bound


def _token_array(tokens: Sequence[int]) -> array:
    """Token ids as a little-endian uint32 array; a clear error for ids out of range."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):  # array() would read them as raw machine words
        tokens = list(tokens)  # each byte one token id, as the C path reads them
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError):
        for t in tokens:
            if not isinstance(t, int):
                raise TypeError(f"token ids must be integers, got {type(t).__name__}: {t!r}") from None
            if not 0 <= t < 2**32:
                raise ValueError(f"token id {t!r} is outside 0..2**32-1") from None
        raise
    if _BIG_ENDIAN:  # pragma: no cover - the framing is little-endian everywhere
        arr.byteswap()
    return arr


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """Little-endian uint32 framing of token ids (the bytes a chunk key hashes)."""
    return _token_array(tokens).tobytes()


@dataclass(slots=True, frozen=True)
class Namespace:
    """What must match for two engines to share KV: model, layout, rank, tenant, hash mode."""

    model_fingerprint: str
    layout_id: bytes
    tp_rank: int = 0
    tenant_salt: str = ""
    hash_mode: str = DEFAULT_HASH_MODE
    extras: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        get_hash_mode(self.hash_mode)
        if not self.model_fingerprint:
            raise ConfigError("namespace.model_fingerprint must not be empty")
        if isinstance(self.tp_rank, bool) or not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < 2**32:
            raise ConfigError(f"namespace.tp_rank must be an integer in 0..2**32-1, got {self.tp_rank!r}")

    def root(self) -> ChunkKey:
        """The parent key of every chain's first chunk."""
        mode = get_hash_mode(self.hash_mode)
        data = _frame(
            b"kvtier-namespace",
            _U32.pack(KEY_SCHEME_VERSION),
            self.model_fingerprint.encode(),
            self.layout_id,
            _U32.pack(self.tp_rank),
            self.tenant_salt.encode(),
            self.hash_mode.encode(),
            _frame(*(e.encode() for e in self.extras)),
        )
        return ChunkKey(mode.digest(data))


def model_fingerprint(config_text: str, weight_identity: str) -> str:
    """Fingerprint of a model: its config (canonical text) plus an identity of its weights."""
    data = _frame(b"kvtier-model", config_text.encode(), weight_identity.encode())
    return hashlib.sha256(data).hexdigest()


def chunk_key(
    mode: HashMode, parent: bytes, token_bytes: bytes, extra_keys: Sequence[bytes] = ()
) -> ChunkKey:
    """Key of one chunk from its parent key, its tokens (as tokens_to_bytes) and extras."""
    return ChunkKey(mode.digest(parent + _frame(*extra_keys) + token_bytes))


def chunk_keys(
    root: bytes,
    tokens: Sequence[int],
    chunk_tokens: int,
    hash_mode: str = DEFAULT_HASH_MODE,
    extra_keys: Sequence[bytes] = (),
) -> list[ChunkKey]:
    """Keys of every full chunk of `tokens` (a partial last chunk has no key)."""
    chain = KeyChain(root, chunk_tokens, hash_mode, extra_keys)
    return chain.extend(tokens)


class KeyChain:
    """Keys of one request's prompt, computed once per full chunk as tokens arrive.

    extend(tokens) appends tokens and returns the keys of the chunks it completed;
    `keys` holds every key so far; a partial tail waits for more tokens.
    """

    __slots__ = ("root", "chunk_tokens", "_mode", "_extras", "keys", "_pending", "num_tokens")

    def __init__(
        self,
        root: bytes,
        chunk_tokens: int,
        hash_mode: str = DEFAULT_HASH_MODE,
        extra_keys: Sequence[bytes] = (),
    ) -> None:
        if not 0 < chunk_tokens <= MAX_CHUNK_TOKENS:  # (the C loop allocates a chunk's bytes per call)
            raise ConfigError(f"chunk_tokens must be in 1..{MAX_CHUNK_TOKENS}, got {chunk_tokens}")
        self._mode = get_hash_mode(hash_mode)
        if len(root) != self._mode.key_bytes:
            raise ValueError(
                f"root key has {len(root)} bytes; hash mode {hash_mode!r} uses {self._mode.key_bytes}"
            )
        self.root = root
        self.chunk_tokens = chunk_tokens
        self._extras = tuple(extra_keys)
        self.keys: list[ChunkKey] = []
        self._pending: list[int] = []
        self.num_tokens = 0

    def extend(self, tokens: Sequence[int]) -> list[ChunkKey]:
        if self._pending:
            tokens = self._pending + list(tokens)
        parent = self.keys[-1] if self.keys else self.root
        extras = _frame(*self._extras)
        new: list[ChunkKey] | None = None
        if _c_chain_sha256 is not None and self._mode.name == "sha256":
            try:
                new = _c_chain_sha256(parent, extras, tokens, self.chunk_tokens)  # type: ignore[assignment]  # bytes
            except (TypeError, ValueError, OverflowError):
                pass  # a token the C loop refuses: the Python loop raises its clear error (or copes)
        if new is None:
            new = _chain_python(self._mode, parent, extras, tokens, self.chunk_tokens)
        # only now, after every token was accepted: a refused extend leaves the chain as it was
        self.num_tokens += len(tokens) - len(self._pending)
        full = len(tokens) - len(tokens) % self.chunk_tokens
        self._pending = list(tokens[full:])
        self.keys.extend(new)
        return new

    def partial_key(self) -> ChunkKey | None:
        """Key of the pending partial chunk (the 1..chunk_tokens-1 tokens after the last full
        chunk), or None when the tokens so far end on a chunk boundary.

        key = H(parent | frame(extra keys..., PARTIAL_CHUNK_MARK) | the partial's token bytes):
        the mark in the count-prefixed extras frame and the shorter token run keep it apart
        from every full chunk's key; the token bytes' length says how many tokens it holds.
        Used to store a prompt's last partial chunk, so that an exact repeat hits every token
        but the last. Nothing chains from it.
        """
        if not self._pending:
            return None
        parent = self.keys[-1] if self.keys else self.root
        data = parent + _frame(*self._extras, PARTIAL_CHUNK_MARK) + tokens_to_bytes(self._pending)
        return ChunkKey(self._mode.digest(data))

    def __len__(self) -> int:
        return len(self.keys)


def _chain_python(
    mode: HashMode, parent: bytes, extras: bytes, tokens: Sequence[int], chunk_tokens: int
) -> list[ChunkKey]:
    """Keys of every full chunk: key = H(parent | extras | chunk's tokens), each the next parent.

    The reference for the C loop (kvtier.core._chainhash), and the loop of every other mode.
    """
    mv = memoryview(_token_array(tokens)).cast("B")
    step = 4 * chunk_tokens
    full = len(mv) - len(mv) % step
    copy_empty = mode.new(b"").copy  # copying a started context skips OpenSSL's per-call setup
    new: list[ChunkKey] = []
    append = new.append
    # one context a chunk over parent | extras | the chunk's token bytes (sliced, not copied,
    # from one conversion of the whole list): this loop is the scheduler's hot path
    for off in range(0, full, step):
        h = copy_empty()
        h.update(parent)
        h.update(extras)
        h.update(mv[off : off + step])
        parent = h.digest()
        append(parent)  # type: ignore[arg-type]  # a ChunkKey is its bytes
    return new
