"""Stored chunk format: a 4 KiB-aligned header, then typed sections.

Header (little-endian), padded to a multiple of 4096 bytes so payload reads can use
direct I/O:

    0   8  magic b"KVTCHNK1"          48  32 key (zero padded)
    8   2  format version            80  32 parent key (zero padded)
    10  2  flags (0)                 112  8 file bytes (header + sections)
    12  4  header bytes              120  8 xxh3_64 of the header with this field zeroed
    16 16  layout id                 128  .. section table, 32 bytes per entry:
    32  1  key length                        kind u16, index u16, reserved u32,
    33  1  reserved                          offset u64, length u64, xxh3_64 u64
    34  2  section count
    36  4  tokens in the chunk
    40  4  depth (chunk index in its chain)
    44  4  reserved

Each section starts on a 4096-byte boundary and carries its own checksum, so a reader
of one layer verifies only what it read. Anything malformed raises CorruptChunkError;
callers turn that into a miss. New section kinds can be added without a format bump;
a changed header layout bumps FORMAT_VERSION (readers refuse other versions).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from kvtier.core.errors import CorruptChunkError, NewerFormatError

MAGIC = b"KVTCHNK1"
FORMAT_VERSION = 1
ALIGN = 4096
MAX_KEY_BYTES = 32

SECTION_KV = 1  # one layer of KV payload; index = layer
SECTION_SUMMARY = 2  # sparse-attention block summaries; index = layer
SECTION_POSITIONS = 3  # RoPE positions for non-prefix reuse
SECTION_BLOCK_HASHES = 4  # the engine's block hashes of the chunk's blocks (KV events); index 0

_FIXED = struct.Struct("<8sHHI16sBBHIII32s32sQQ")
_ENTRY = struct.Struct("<HHIQQQ")
assert _FIXED.size == 128 and _ENTRY.size == 32


# Fast section checksum (xxh3_64 of any buffer; runs at memory speed). The C function itself,
# not a Python wrapper: the DRAM tier calls it once per section on its hot path.
checksum: Callable[[Any], int] = xxhash.xxh3_64_intdigest


def _xxh3_letting_go_of_the_gil() -> Callable[[int, int], int] | None:
    """XXH3_64bits of the xxhash extension module called through ctypes, which releases the GIL for
    the call: the module's own functions hold it while they hash (measured: a Python thread spinning
    beside a 64 MiB xxh3_64_intdigest made no progress), so checksums on several threads ran one at
    a time. None where the symbol is not exported or does not agree with `checksum` (checked here)."""
    try:
        from xxhash import _xxhash  # type: ignore[attr-defined]

        fn = ctypes.CDLL(_xxhash.__file__).XXH3_64bits
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_uint64
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    probe = bytes(range(256)) * 70  # 17,920 bytes: past xxh3's short-input paths
    buf = ctypes.create_string_buffer(probe, len(probe))
    if any(fn(ctypes.addressof(buf), n) != checksum(probe[:n]) for n in (0, 3, 100, 240, len(probe))):
        return None
    return fn


# checksum_at(address, nbytes): `checksum` of raw memory, letting go of the GIL while it hashes
# (~0.5 us more per call than `checksum`; worth it where several threads verify at once).
# CHECKSUM_AT_RELEASES_GIL says whether it does (else it is `checksum` over a ctypes view).
_xxh3_at = _xxh3_letting_go_of_the_gil()
CHECKSUM_AT_RELEASES_GIL = _xxh3_at is not None


def checksum_at(address: int, nbytes: int) -> int:
    if _xxh3_at is not None:
        return int(_xxh3_at(address, nbytes))
    return checksum((ctypes.c_ubyte * nbytes).from_address(address))


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(slots=True, frozen=True)
class Section:
    kind: int
    index: int
    offset: int
    length: int
    checksum: int


@dataclass(slots=True, frozen=True)
class ChunkHeader:
    layout_id: bytes
    key: bytes
    parent: bytes
    depth: int
    num_tokens: int
    sections: tuple[Section, ...]
    header_bytes: int
    file_bytes: int

    def section(self, kind: int, index: int) -> Section | None:
        for s in self.sections:
            if s.kind == kind and s.index == index:
                return s
        return None


def header_size(num_sections: int) -> int:
    return align_up(_FIXED.size + _ENTRY.size * num_sections)


def plan_offsets(num_sections: int, lengths: list[int]) -> tuple[int, list[int], int]:
    """(header bytes, offset of each section, file bytes) for sections of these lengths."""
    off = header_size(num_sections)
    hdr = off
    offsets = []
    for length in lengths:
        offsets.append(off)
        off = align_up(off + length)
    return hdr, offsets, off


def encode_header(
    layout_id: bytes,
    key: bytes,
    parent: bytes,
    depth: int,
    num_tokens: int,
    sections: list[tuple[int, int, int, int]],
) -> tuple[bytes, ChunkHeader]:
    """Header bytes for sections given as (kind, index, length, checksum), laid out in order."""
    if len(layout_id) != 16:
        raise ValueError("layout_id must be 16 bytes")
    if not 0 < len(key) <= MAX_KEY_BYTES or len(parent) != len(key):
        raise ValueError("key and parent must have the same length, 1..32 bytes")
    hdr, offsets, total = plan_offsets(len(sections), [s[2] for s in sections])
    infos = tuple(
        Section(kind, index, off, length, csum)
        for (kind, index, length, csum), off in zip(sections, offsets)
    )
    buf = bytearray(hdr)
    _FIXED.pack_into(
        buf, 0, MAGIC, FORMAT_VERSION, 0, hdr, layout_id, len(key), 0, len(sections),
        num_tokens, depth, 0, key.ljust(32, b"\0"), parent.ljust(32, b"\0"), total, 0,
    )
    for i, s in enumerate(infos):
        _ENTRY.pack_into(buf, _FIXED.size + i * _ENTRY.size, s.kind, s.index, 0, s.offset, s.length, s.checksum)
    struct.pack_into("<Q", buf, 120, checksum(buf))
    header = ChunkHeader(layout_id, key, parent, depth, num_tokens, infos, hdr, total)
    return bytes(buf), header


def decode_header(data: bytes | bytearray | memoryview, file_bytes: int | None = None) -> ChunkHeader:
    """Parse and verify a header; raises CorruptChunkError on anything malformed.

    `data` must hold at least the first 4096 bytes (all of the header if it is longer);
    `file_bytes`, when given, is checked against the size the header declares.
    """
    if len(data) < _FIXED.size:
        raise CorruptChunkError(f"truncated header: {len(data)} bytes")
    (magic, version, _flags, hdr, layout_id, key_len, _r1, nsec, ntok, depth, _r2,
     key, parent, total, hsum) = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptChunkError("bad magic: not a kvtier chunk")
    if version > FORMAT_VERSION:
        raise NewerFormatError(f"chunk format version {version} is newer than this kvtier's {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise CorruptChunkError(f"unsupported chunk format version {version}")
    if hdr != header_size(nsec) or len(data) < hdr:
        raise CorruptChunkError("header length does not match its section count or is truncated")
    if not 0 < key_len <= MAX_KEY_BYTES:
        raise CorruptChunkError(f"bad key length {key_len}")
    copy = bytearray(data[:hdr])
    struct.pack_into("<Q", copy, 120, 0)
    if checksum(copy) != hsum:
        raise CorruptChunkError("header checksum mismatch")
    sections = []
    end = hdr
    for i in range(nsec):
        kind, index, _r, off, length, csum = _ENTRY.unpack_from(data, _FIXED.size + i * _ENTRY.size)
        if off < end or off % ALIGN:
            raise CorruptChunkError(f"section {i} has a bad offset {off}")
        end = off + length
        sections.append(Section(kind, index, off, length, csum))
    if end > total:
        raise CorruptChunkError("sections run past the declared file size")
    if file_bytes is not None and file_bytes != total:
        raise CorruptChunkError(f"file has {file_bytes} bytes, header declares {total}")
    return ChunkHeader(layout_id, bytes(key[:key_len]), bytes(parent[:key_len]), depth, ntok,
                       tuple(sections), hdr, total)


# -- SECTION_BLOCK_HASHES -------------------------------------------------------------------------
# The engine's own hashes of the blocks a chunk holds (vLLM's, as its KV events publish them: a
# 64-bit int, or bytes when vLLM publishes raw hashes), and the hash of the block before the
# chunk's first (None at a prompt's start), so that kvtier's KV events name blocks the way the
# engine's do. Layout (little-endian): version u8 (1), count u16, then count + 1 entries, the
# parent first: tag u8 (0 none, 1 u64, 2 bytes), then a u64, or a u8 length and that many bytes.
BlockHashValue = int | bytes
_BH_VERSION = 1


def encode_block_hashes(parent: BlockHashValue | None, hashes: list[BlockHashValue]) -> bytes:
    """The SECTION_BLOCK_HASHES payload; ValueError for a hash that is neither a u64 nor <= 255 bytes."""
    if not hashes or len(hashes) > 0xFFFF:
        raise ValueError(f"block hashes: 1 to 65535 of them, got {len(hashes)}")
    out = bytearray(struct.pack("<BH", _BH_VERSION, len(hashes)))
    for i, h in enumerate([parent, *hashes]):
        if h is None and i == 0:
            out.append(0)
        elif isinstance(h, bool) or not isinstance(h, (int, bytes)):
            raise ValueError(f"block hash {i - 1 if i else 'parent'}: an int or bytes, got {type(h).__name__}")
        elif isinstance(h, int):
            if not 0 <= h < 1 << 64:
                raise ValueError(f"block hash {i - 1 if i else 'parent'}: an int must fit in 64 bits, got {h}")
            out += struct.pack("<BQ", 1, h)
        else:
            if len(h) > 255:
                raise ValueError(f"block hash {i - 1 if i else 'parent'}: at most 255 bytes, got {len(h)}")
            out += struct.pack("<BB", 2, len(h)) + h
    return bytes(out)


def decode_block_hashes(data: bytes | bytearray | memoryview) -> tuple[BlockHashValue | None, list[BlockHashValue]]:
    """(parent, hashes) from a SECTION_BLOCK_HASHES payload; CorruptChunkError if it is not one."""
    data = bytes(data)
    try:
        version, count = struct.unpack_from("<BH", data, 0)
        if version != _BH_VERSION or count == 0:
            raise CorruptChunkError(f"block hashes section: version {version}, {count} hashes")
        at = 3
        values: list[BlockHashValue | None] = []
        for _ in range(count + 1):
            tag = data[at]
            at += 1
            if tag == 0 and not values:
                values.append(None)
            elif tag == 1:
                values.append(struct.unpack_from("<Q", data, at)[0])
                at += 8
            elif tag == 2:
                n = data[at]
                if at + 1 + n > len(data):
                    raise CorruptChunkError("block hashes section: truncated")
                values.append(data[at + 1:at + 1 + n])
                at += 1 + n
            else:
                raise CorruptChunkError(f"block hashes section: bad tag {tag}")
    except (struct.error, IndexError) as e:
        raise CorruptChunkError("block hashes section: truncated") from e
    if at != len(data):
        raise CorruptChunkError(f"block hashes section: {len(data) - at} trailing bytes")
    return values[0], [v for v in values[1:] if v is not None]
