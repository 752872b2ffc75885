# Types of the optional C extension built from _chainhash.c (see keys.py).
from collections.abc import Sequence

def chain_sha256(parent: bytes, extras: bytes, tokens: Sequence[int], chunk_tokens: int, /) -> list[bytes]: ...
