"""Block summaries: values, stored bytes, and a save + reload through the TieredStore."""

from __future__ import annotations

import pytest
import torch

from kvtier.core.codec import SECTION_SUMMARY
from kvtier.core.errors import CorruptChunkError
from kvtier.sparse import SparseKV, Summarizer
from kvtier.sparse.summary import pack_signs, unpack_signs

from .helpers import LAYOUT, config, fill, make_store


def test_summary_fields() -> None:
    k = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    s = Summarizer(2, 3, hash_bits=8).compute(k, 4)
    assert s.num_blocks == 2
    assert torch.equal(s.kmin[0, 1], k[0, 4])
    assert torch.equal(s.kmax[1, 0], k[1, 3])
    assert torch.allclose(s.kmean[0, 0], k[0, :4].mean(0))
    assert s.codes.shape == (2, 2, 4, 1) and s.codes.dtype == torch.uint8  # 8 sign bits per key
    assert torch.allclose(s.norms[1, 1], k[1, 4:].norm(dim=-1))


def test_sign_bits_round_trip() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_signs(pack_signs(x)), torch.where(x > 0, 1.0, -1.0))


def test_encode_decode_and_corrupt_bytes() -> None:
    summ = Summarizer(2, 8, hash_bits=16)
    s = summ.compute(torch.randn(2, 12, 8), 4)
    one = summ.decode(summ.encode(s, 1))
    assert len(summ.encode(s, 1)) == summ.stored_bytes(4)
    for f in ("kmin", "kmax", "kmean", "codes", "norms"):
        assert torch.equal(getattr(one, f)[:, 0], getattr(s, f)[:, 1])
    with pytest.raises(CorruptChunkError):
        summ.decode(summ.encode(s, 0)[:-1])
    with pytest.raises(CorruptChunkError):
        Summarizer(2, 8, hash_bits=32).decode(summ.encode(s, 0))


@pytest.mark.parametrize("with_disk", [False, True])
def test_summaries_survive_save_and_reload(tmp_path, with_disk: bool) -> None:
    root = str(tmp_path / "disk") if with_disk else None
    store = make_store(disk_root=root)
    kv = SparseKV(store, config(), LAYOUT, salt=b"reload")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 22, 8, generator=g)
    fill(kv, k, torch.randn(2, 2, 22, 8, generator=g), 9)
    kv.flush()
    keys = list(kv.block_keys)
    assert len(keys) == 5
    if with_disk:
        store.close()
        store = make_store(disk_root=root, memory_bytes=0)  # a fresh process: the disk tier only
    summ = Summarizer(2, 8, 64)
    for layer in range(2):
        expect = summ.compute(k[layer, :, :20], 4)
        for b, key in enumerate(keys):
            data = store.read_section(key, SECTION_SUMMARY, layer)
            assert data is not None
            got = summ.decode(data)
            assert torch.equal(got.kmin[:, 0], expect.kmin[:, b])
            assert torch.equal(got.codes[:, 0], expect.codes[:, b])
            assert torch.equal(got.norms[:, 0], expect.norms[:, b])
    store.close()
