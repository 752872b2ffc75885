"""Per-block key summaries: computed once when a block's keys are written, scanned every step.

A summary of one block of one layer holds, per KV head: the per-channel min and max of the
block's keys (Quest's bounds), their mean (block-mean retrieval), and for every key of the
block `hash_bits` sign bits of the key projected on a fixed seeded Gaussian matrix plus the
key's norm (a sign-hash sketch as in HATA/KVComp: with 64 bits, 12 bytes per key instead of
4 * head_size). It is stored as the chunk's SECTION_SUMMARY section (index = layer) so a
reload finds it without touching the KV, and a SummaryTable keeps the fields the active
policy needs in fast memory: O(context / block_tokens) rows per KV head (the bounds in the KV's
dtype when it is 16-bit, rounded outward: see SummaryTable).

Stored bytes (little-endian): b"KVSM", u16 version, u16 kv_heads, u16 head_size, u16 hash_bits,
u16 block_tokens, then float32 min, max, mean as [kv_heads, head_size] each, the packed bits
[kv_heads, block_tokens, hash_bits / 8] and float32 key norms [kv_heads, block_tokens].
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.core.errors import CorruptChunkError

SUMMARY_MAGIC = b"KVSM"
SUMMARY_VERSION = 2
_HEADER = struct.Struct("<4sHHHHH")
FIELDS = ("kmin", "kmax", "kmean", "codes", "norms")
# a scan upcasts at most this many bytes of 16-bit summaries to float32 at once (SummaryTable.upcast_pieces):
# 2048 blocks (128k tokens) of an 8B layer's kmin and kmax in one piece, one matmul per layer
SCAN_CHUNK_BYTES = 32 << 20
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(slots=True, frozen=True)
class BlockSummaries:
    """Summaries of n consecutive blocks of B tokens of one layer: kmin, kmax, kmean float32 [H, n, d];
    codes uint8 [H, n, B, bits/8] (each key's sign bits); norms float32 [H, n, B] (each key's norm)."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor
    codes: torch.Tensor
    norms: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return int(self.kmin.shape[1])


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Sign bits of the last dim (a multiple of 8), packed little-endian into uint8."""
    bits = (x > 0).to(torch.uint8).unflatten(-1, (-1, 8))
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(codes: torch.Tensor) -> torch.Tensor:
    """+1/-1 float32 from packed sign bits: [..., bits/8] -> [..., bits]."""
    bits = (codes.unsqueeze(-1) & _BIT_WEIGHTS.to(codes.device)).ne(0)
    return bits.flatten(-2).to(torch.float32).mul_(2).sub_(1)


class Summarizer:
    """Computes and (de)serializes block summaries for one KV layout.

    `compute` runs on the device of the keys it is given (the projection lives on `device`, drawn on
    the CPU from the seed so every device hashes alike); the stored bytes are made on the host."""

    def __init__(self, kv_heads: int, head_size: int, hash_bits: int = 64, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        self.kv_heads = kv_heads
        self.head_size = head_size
        self.hash_bits = hash_bits
        gen = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(head_size, hash_bits, generator=gen, dtype=torch.float32).to(device or "cpu")

    def stored_bytes(self, block_tokens: int) -> int:
        per_key = self.hash_bits // 8 + 4
        return _HEADER.size + 3 * self.kv_heads * self.head_size * 4 + self.kv_heads * block_tokens * per_key

    def compute(self, keys: torch.Tensor, block_tokens: int) -> BlockSummaries:
        """Summaries of the whole blocks in keys [H, n * block_tokens, d]."""
        h, t, d = keys.shape
        if t % block_tokens:
            raise ValueError(f"{t} tokens are not whole blocks of {block_tokens}")
        blocks = keys.to(torch.float32).reshape(h, t // block_tokens, block_tokens, d)
        codes = pack_signs(blocks @ self.projection)
        return BlockSummaries(blocks.amin(2), blocks.amax(2), blocks.mean(2), codes, blocks.norm(dim=-1))

    def encode_all(self, s: BlockSummaries) -> list[bytes]:
        """Stored bytes of every block of `s`: one device -> host copy per field for the whole span
        (not five small copies per block), then plain byte slicing."""
        n = s.num_blocks
        block_tokens = s.codes.shape[2]
        header = _HEADER.pack(SUMMARY_MAGIC, SUMMARY_VERSION, self.kv_heads, self.head_size, self.hash_bits,
                              block_tokens)
        # [n, ...] per field, block-major, so block i's bytes are one contiguous row
        fields = [t.transpose(0, 1).contiguous().cpu().numpy().astype("<f4", copy=False) for t in (s.kmin, s.kmax, s.kmean)]
        fields.append(s.codes.transpose(0, 1).contiguous().cpu().numpy())
        fields.append(s.norms.transpose(0, 1).contiguous().cpu().numpy().astype("<f4", copy=False))
        rows = [f.reshape(n, -1) for f in fields]
        return [header + b"".join(r[i].tobytes() for r in rows) for i in range(n)]

    def encode(self, s: BlockSummaries, i: int) -> bytes:
        """Stored bytes of block i of `s`."""
        block_tokens = s.codes.shape[2]
        parts = [_HEADER.pack(SUMMARY_MAGIC, SUMMARY_VERSION, self.kv_heads, self.head_size, self.hash_bits,
                              block_tokens)]
        for t in (s.kmin, s.kmax, s.kmean):
            parts.append(t[:, i].contiguous().cpu().numpy().astype("<f4", copy=False).tobytes())
        parts.append(s.codes[:, i].contiguous().cpu().numpy().tobytes())
        parts.append(s.norms[:, i].contiguous().cpu().numpy().astype("<f4", copy=False).tobytes())
        return b"".join(parts)

    def decode(self, data: bytes) -> BlockSummaries:
        """One block's summaries from stored bytes; CorruptChunkError when they do not fit this layout."""
        if len(data) < _HEADER.size:
            raise CorruptChunkError(f"summary section has {len(data)} bytes, shorter than its header")
        magic, version, heads, size, bits, block_tokens = _HEADER.unpack_from(data, 0)
        if (magic, version, heads, size, bits) != (SUMMARY_MAGIC, SUMMARY_VERSION, self.kv_heads,
                                                   self.head_size, self.hash_bits):
            raise CorruptChunkError("summary section header does not match this layout or version")
        if len(data) != self.stored_bytes(block_tokens):
            raise CorruptChunkError(f"summary section has {len(data)} bytes, expected "
                                    f"{self.stored_bytes(block_tokens)}")
        off = _HEADER.size
        n = self.kv_heads * self.head_size
        out = []
        for _ in range(3):
            arr = np.frombuffer(data, dtype="<f4", count=n, offset=off).reshape(self.kv_heads, 1, self.head_size)
            out.append(torch.from_numpy(arr.astype(np.float32)))
            off += 4 * n
        m = self.kv_heads * block_tokens * (self.hash_bits // 8)
        codes = np.frombuffer(data, dtype=np.uint8, count=m, offset=off)
        codes = codes.reshape(self.kv_heads, 1, block_tokens, self.hash_bits // 8)
        off += m
        norms = np.frombuffer(data, dtype="<f4", count=self.kv_heads * block_tokens, offset=off)
        norms = norms.reshape(self.kv_heads, 1, block_tokens).astype(np.float32)
        return BlockSummaries(out[0], out[1], out[2], torch.from_numpy(codes.copy()), torch.from_numpy(norms))


BOUND_FIELDS = ("kmin", "kmax", "kmean")


def round_outward(x: torch.Tensor, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """x (float32) in `dtype`, each value rounded to the nearest one of `dtype` and then, where that
    moved it the wrong way, one step further toward `toward` (-inf: the result is <= x, +inf: >= x),
    so a per-channel min (max) stays a lower (upper) bound of every key it summarizes."""
    y = x.to(dtype)
    wrong = y.float() > x if toward < 0 else y.float() < x
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, toward)), y)


class SummaryTable:
    """Fast-memory summaries of one layer: the fields a policy scans, grown in steps of `grow` blocks.

    `bounds_dtype` is the dtype kmin, kmax and kmean are kept in: float32 by default; SparseKV passes
    the KV's dtype when it is 16-bit (bfloat16 / float16), halving the table (at 128k tokens of an
    8B-shaped layer, 16 MiB of Quest bounds in float32 were 1/32 of the layer's KV, half of a 1/16
    budget). The min and max of keys stored in that dtype are values of it, so the cast loses
    nothing; `round_outward` keeps them true bounds for any input all the same. The mean is rounded
    to nearest. Policies upcast what they scan to float32 a piece of blocks at a time (`upcast_pieces`)."""

    def __init__(self, kv_heads: int, head_size: int, hash_bits: int, fields: tuple[str, ...], block_tokens: int,
                 grow: int = 64, device: torch.device | str | None = None,
                 bounds_dtype: torch.dtype = torch.float32) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown summary fields {sorted(unknown)}; known: {FIELDS}")
        if bounds_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"bounds_dtype must be float32, bfloat16 or float16, got {bounds_dtype}")
        self.fields = fields
        self.num_blocks = 0
        self._grow = grow
        self._shape: dict[str, tuple[int, ...]] = {
            "kmin": (head_size,), "kmax": (head_size,), "kmean": (head_size,),
            "codes": (block_tokens, hash_bits // 8), "norms": (block_tokens,)}
        self._dtype = {"kmin": bounds_dtype, "kmax": bounds_dtype, "kmean": bounds_dtype, "codes": torch.uint8,
                       "norms": torch.float32}
        self.bounds_dtype = bounds_dtype
        self._kv_heads = kv_heads
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._data: dict[str, torch.Tensor] = {
            f: torch.empty(kv_heads, 0, *self._shape[f], dtype=self._dtype[f], device=self.device) for f in fields
        }

    def _stored(self, field: str, x: torch.Tensor) -> torch.Tensor:
        """A field of BlockSummaries as this table keeps it (the bounds rounded outward)."""
        x = x.to(self.device)
        dtype = self._dtype[field]
        if x.dtype == dtype:
            return x
        if field in ("kmin", "kmax") and dtype != torch.float32:
            return round_outward(x.float(), dtype, float("-inf") if field == "kmin" else float("inf"))
        return x.to(dtype)

    def append(self, s: BlockSummaries) -> None:
        n = s.num_blocks
        end = self.num_blocks + n
        for f in self.fields:
            buf = self._data[f]
            if end > buf.shape[1]:
                cap = -(-end // self._grow) * self._grow
                new = torch.empty(self._kv_heads, cap, *self._shape[f], dtype=self._dtype[f], device=self.device)
                new[:, : self.num_blocks] = buf[:, : self.num_blocks]
                self._data[f] = buf = new
            buf[:, self.num_blocks : end] = self._stored(f, getattr(s, f))
        self.num_blocks = end

    def get(self, field: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) of one field: [H, hi - lo, ...] (a view, no copy), in the table's dtype."""
        hi = self.num_blocks if hi is None else hi
        return self._data[field][:, lo:hi]

    def upcast_pieces(self, fields: tuple[str, ...], lo: int, hi: int,
                      max_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """Blocks lo..hi-1 of per-channel `fields` (kmin, kmax, kmean) in float32, side by side:
        [H, n, len(fields) * head_size] pieces of consecutive blocks, each at most `max_bytes`, so a
        scan of a 16-bit table multiplies one upcast piece by one matmul and never holds the whole
        layer in float32 (`max_bytes` None: SCAN_CHUNK_BYTES)."""
        if any(f not in BOUND_FIELDS for f in fields):
            raise ValueError(f"upcast_pieces takes per-channel fields {BOUND_FIELDS}, got {fields}")
        d = self._shape["kmin"][0]
        per_block = self._kv_heads * len(fields) * d * 4
        step = max(1, (SCAN_CHUNK_BYTES if max_bytes is None else max_bytes) // per_block)
        for a in range(lo, max(hi, lo + 1), step):
            b = min(hi, a + step)
            out = torch.empty(self._kv_heads, b - a, len(fields) * d, device=self.device)
            for i, f in enumerate(fields):
                out[..., i * d : (i + 1) * d].copy_(self.get(f, a, b))
            yield out

    def tensors(self) -> list[torch.Tensor]:
        """The buffers of every field (capacity, not just the rows in use)."""
        return list(self._data.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())
