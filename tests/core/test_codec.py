import pytest

from kvtier.core import codec
from kvtier.core.errors import CorruptChunkError

KEY = bytes(range(32))
PARENT = bytes(range(32, 64))
LID = bytes(16)


def make(sections=((codec.SECTION_KV, 0, 8192, 11), (codec.SECTION_KV, 1, 8192, 22))):
    return codec.encode_header(LID, KEY, PARENT, 3, 16, list(sections))


def test_roundtrip_and_alignment():
    data, hdr = make()
    assert len(data) == 4096 and hdr.header_bytes == 4096
    assert [s.offset for s in hdr.sections] == [4096, 4096 + 8192]
    assert hdr.file_bytes == 4096 + 2 * 8192
    back = codec.decode_header(data, hdr.file_bytes)
    assert back == hdr
    assert back.section(codec.SECTION_KV, 1).checksum == 22
    assert back.section(codec.SECTION_SUMMARY, 0) is None


def test_unaligned_sections_are_padded():
    _, hdr = make([(codec.SECTION_KV, 0, 100, 1), (codec.SECTION_SUMMARY, 0, 10, 2)])
    assert [s.offset for s in hdr.sections] == [4096, 8192]
    assert hdr.file_bytes == 12288


def test_many_sections_grow_header():
    secs = [(codec.SECTION_KV, i, 4096, i) for i in range(200)]
    data, hdr = make(secs)
    assert hdr.header_bytes == len(data) == codec.align_up(128 + 32 * 200)
    assert codec.decode_header(data) == hdr


@pytest.mark.parametrize("pos", [0, 9, 20, 40, 60, 100, 115, 130, 150, 4000])
def test_any_flipped_header_byte_is_detected(pos):
    data, _ = make()
    bad = bytearray(data)
    bad[pos] ^= 0x40
    with pytest.raises(CorruptChunkError):
        codec.decode_header(bad)


def test_truncated_and_size_mismatch():
    data, hdr = make()
    with pytest.raises(CorruptChunkError, match="truncated"):
        codec.decode_header(data[:64])
    with pytest.raises(CorruptChunkError):
        codec.decode_header(data[:2000])
    with pytest.raises(CorruptChunkError, match="declares"):
        codec.decode_header(data, hdr.file_bytes - 1)


def test_checksum_is_xxh3_64():
    assert codec.checksum(b"") == 0x2D06800538D394C2


@pytest.mark.parametrize("releases_gil", [True, False])
def test_checksum_at_equals_checksum_of_the_bytes(monkeypatch, releases_gil: bool) -> None:
    import ctypes

    if not releases_gil:
        monkeypatch.setattr(codec, "_xxh3_at", None)  # the fallback: checksum over a ctypes view
    data = bytes((i * 7) % 251 for i in range(20000))
    buf = ctypes.create_string_buffer(data, len(data))
    base = ctypes.addressof(buf)
    for start, n in ((0, 0), (5, 3), (100, 240), (0, len(data)), (4096, 8192)):
        assert codec.checksum_at(base + start, n) == codec.checksum(data[start : start + n])
