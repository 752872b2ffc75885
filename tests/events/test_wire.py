"""The wire format is vLLM 0.32's: decoded by vLLM's own msgspec classes, bytes pinned."""

import msgspec
import pytest

from kvtier.events import AllBlocksCleared, BatchCodec, BlockRemoved, BlockStored, block_hash_of

EVENTS = [BlockStored([1, 2**64 - 1], 7, [], 16, None, "CPU", None), BlockRemoved([3], "STORAGE"), AllBlocksCleared()]


def test_map_encoding_decodes_with_vllms_classes():
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    payload = BatchCodec("map").encode(1.5, EVENTS, 0)
    batch = msgspec.msgpack.decode(payload, type=kv_events.KVEventBatch)
    stored, removed, cleared = batch.events
    assert isinstance(stored, kv_events.BlockStored) and stored.block_hashes == [1, 2**64 - 1]
    assert stored.parent_block_hash == 7 and stored.block_size == 16 and stored.medium == kv_events.MEDIUM_CPU
    assert isinstance(removed, kv_events.BlockRemoved) and removed.block_hashes == [3]
    assert removed.medium == kv_events.MEDIUM_STORAGE
    assert isinstance(cleared, kv_events.AllBlocksCleared)
    assert batch.ts == 1.5 and batch.data_parallel_rank == 0
    # and vLLM's own encoder produces the same bytes for the same events
    theirs = kv_events.KVEventBatch(1.5, [kv_events.BlockStored([1, 2**64 - 1], 7, [], 16, None, "CPU", None),
                                          kv_events.BlockRemoved([3], "STORAGE"), kv_events.AllBlocksCleared()], 0)
    assert msgspec.msgpack.encode(theirs) == payload


def test_map_and_array_bytes_are_pinned():
    # golden bytes: [ts (float64), [events], rank]; a map per event, or an array tagged first
    assert BatchCodec("map").encode(1.5, EVENTS[1:], None).hex() == (
        "93cb3ff80000000000009283a474797065ac426c6f636b52656d6f766564ac626c6f636b5f686173686573"
        "9103a66d656469756da753544f5241474581a474797065b0416c6c426c6f636b73436c6561726564c0")
    assert BatchCodec("array").encode(1.5, EVENTS[1:], None).hex() == (
        "93cb3ff80000000000009293ac426c6f636b52656d6f7665649103a753544f5241474591b0416c6c426c6f636b73436c6561726564c0")
    plain = msgspec.msgpack.decode(BatchCodec("map").encode(1.5, EVENTS, None))
    assert plain == [1.5, [
        {"type": "BlockStored", "block_hashes": [1, 2**64 - 1], "parent_block_hash": 7, "token_ids": [],
         "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None},
        {"type": "BlockRemoved", "block_hashes": [3], "medium": "STORAGE"},
        {"type": "AllBlocksCleared"},
    ], None]
    plain = msgspec.msgpack.decode(BatchCodec("array").encode(1.5, EVENTS, 2))
    assert plain == [1.5, [["BlockStored", [1, 2**64 - 1], 7, [], 16, None, "CPU"],
                           ["BlockRemoved", [3], "STORAGE"], ["AllBlocksCleared"]], 2]


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_codec_roundtrip(encoding):
    codec = BatchCodec(encoding)
    batch = codec.decode(codec.encode(2.0, EVENTS, 1))
    assert batch.events == EVENTS and batch.data_parallel_rank == 1


def test_block_hash_is_the_keys_low_64_bits_as_vllm_truncates_its_own():
    key = bytes(range(16))
    assert block_hash_of(key) == 0x08090A0B0C0D0E0F == int.from_bytes(key, "big") & (2**64 - 1)
    assert block_hash_of(b"\xff" * 32) == 2**64 - 1
    with pytest.raises(ValueError, match="at least 8 bytes"):
        block_hash_of(b"short")


def test_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="encoding"):
        BatchCodec("json")


def test_block_hash_matches_vllms_int_conversion(monkeypatch):
    utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    key = bytes(range(100, 132))
    assert utils.maybe_convert_block_hash(key) == block_hash_of(key)
