"""KV layout arithmetic: how many bytes a chunk and one layer of it take.

A stored chunk holds `chunk_tokens` tokens of KV for every layer. Inside one layer's
section the payload order is [kv_heads, planes, chunk_tokens, head_size]: for each KV
head all K rows, then all V rows (kvtier's canonical order; engine adapters copy into and
out of it). An adapter for an engine whose blocks are opaque, such as vLLM's CPU backend
(its page interior depends on the kernel's ISA), stores the page's bytes instead, of the
same size; the page format is then part of the key namespace, so such a chunk is read back
only into pages of the same format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvtier.core.errors import ConfigError

DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(slots=True, frozen=True)
class KVLayout:
    """Shape of the KV cache of one model (one tensor-parallel rank)."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str = "float32"
    planes: int = 2  # K and V; 1 for MLA latents

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "planes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"layout.{name} must be a positive integer, got {value!r}")
        if self.planes not in (1, 2):
            raise ConfigError(f"layout.planes must be 1 or 2, got {self.planes!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_SIZES:
            raise ConfigError(
                f"layout.dtype {self.dtype!r} is not supported; choose one of {sorted(DTYPE_SIZES)}"
            )

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def token_bytes_per_layer(self) -> int:
        """Bytes of KV one token takes in one layer (all heads, all planes)."""
        return self.planes * self.num_kv_heads * self.head_size * self.dtype_size

    def layer_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one layer's section of a chunk."""
        return chunk_tokens * self.token_bytes_per_layer()

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Payload bytes of a whole chunk (all layers, no header)."""
        return self.num_layers * self.layer_bytes(chunk_tokens)

    def section_shape(self, chunk_tokens: int) -> tuple[int, int, int, int]:
        """Shape of one layer's section: (kv_heads, planes, chunk_tokens, head_size)."""
        return (self.num_kv_heads, self.planes, chunk_tokens, self.head_size)

    def layout_id(self, chunk_tokens: int) -> bytes:
        """16-byte identity of (layout, chunk size), stored in every chunk header."""
        text = (
            f"kvtier-layout-v1|{self.num_layers}|{self.num_kv_heads}|{self.head_size}"
            f"|{self.dtype}|{self.planes}|{chunk_tokens}"
        )
        return hashlib.sha256(text.encode()).digest()[:16]


def check_block_size(block_size: int, chunk_tokens: int) -> int:
    """Return how many chunks fit one engine block; the block must be a whole multiple."""
    if chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if block_size <= 0 or block_size % chunk_tokens:
        raise ConfigError(
            f"engine block size {block_size} must be a positive whole multiple of "
            f"the store's chunk_tokens {chunk_tokens}"
        )
    return block_size // chunk_tokens
