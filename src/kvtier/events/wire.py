"""KV events on the wire, byte-compatible with vLLM 0.32's `vllm.distributed.kv_events`.

kvtier does not import vLLM here (only connectors/ may), so it declares msgspec structs with
vLLM's class names, field names and field order. A batch is `[ts, [event, ...], dp_rank]`
(msgpack array). Each event is encoded one of two ways, chosen by `encoding`:

- "map" (vLLM 0.32 and recent): a msgpack map with a "type" tag, e.g.
  `{"type": "BlockStored", "block_hashes": [...], ...}`; fields at their defaults are omitted.
- "array" (older vLLM, before events became maps): `["BlockStored", block_hashes, parent,
  token_ids, block_size, lora_id, medium]`; subscribers written for those releases decode it.

Block hashes: vLLM publishes a block's hash as bytes or, for reproducible hashing, an int.
kvtier publishes `block_hash_of(key)`: the key read as a big-endian integer, masked to its low
64 bits (its last 8 bytes), the same truncation vLLM applies to its own block hashes when
VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES is set (see the README's "KV events" section).

Sequence numbers (the 8-byte frame before each batch): vLLM numbers a publisher's batches 0, 1,
2, ... and a restarted process starts at 0 again, so a subscriber that lost the new process's
first batches (ZMQ's slow joiner) cannot tell its next batch from the dead process's. kvtier's
publisher numbers its batches `join_seq(incarnation, n)`: a random incarnation per process in the
high bits, n = 0, 1, 2, ... below. The payload is untouched (decoders that insist on vLLM's exact
batch array, such as Dynamo's, still read it); to a vLLM-format subscriber the numbers still grow
by one per batch and a replay request still names the first number it wants; only the first
number is no longer 0. Incarnation 0 is vLLM's own numbering: no identity on the wire.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

MEDIUM_CPU = "CPU"  # kvtier's DRAM pool
MEDIUM_STORAGE = "STORAGE"  # disk, shared folder, Redis
ENCODINGS = ("map", "array")
SEQ_COUNTER_BITS = 40  # a batch's number within its incarnation: 10^12 batches, years at any real rate
INCARNATION_BITS = 23  # the top bit stays clear, so a frame read as signed is never negative (END_SEQ is -1)
_COUNTER_MASK = (1 << SEQ_COUNTER_BITS) - 1


def split_seq(number: int) -> tuple[int, int]:
    """A sequence frame's number as (incarnation, batch number within it); vLLM's are (0, number)."""
    return number >> SEQ_COUNTER_BITS, number & _COUNTER_MASK


def join_seq(incarnation: int, seq: int) -> int:
    """The sequence frame's number of batch `seq` of `incarnation` (split_seq's inverse)."""
    return (incarnation << SEQ_COUNTER_BITS) | seq


def new_incarnation() -> int:
    """A random incarnation for a starting publisher, never 0 (vLLM's numbering)."""
    return secrets.randbelow((1 << INCARNATION_BITS) - 1) + 1


def block_hash_of(key: bytes) -> int:
    """The 64-bit block hash kvtier publishes for a chunk key: its last 8 bytes, big-endian
    (vLLM's `int.from_bytes(hash, "big") & (2**64 - 1)`)."""
    if type(key) is not bytes or len(key) < 8:
        raise ValueError(f"a chunk key of at least 8 bytes is needed, got {key!r:.40}")
    return int.from_bytes(key[-8:], "big")


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    pass


# The older array encoding: the same classes with array_like=True (tag first, then the fields).
class _BlockStoredArray(msgspec.Struct, tag="BlockStored", array_like=True, gc=False):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class _BlockRemovedArray(msgspec.Struct, tag="BlockRemoved", array_like=True, gc=False):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    medium: str | None


class _AllBlocksClearedArray(msgspec.Struct, tag="AllBlocksCleared", array_like=True, gc=False):  # type: ignore[call-arg]
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]  # type: ignore[assignment]


class _KVEventBatchArray(EventBatch):
    events: list[_BlockStoredArray | _BlockRemovedArray | _AllBlocksClearedArray]  # type: ignore[assignment]


def _as_array(event: KVEvent) -> Any:
    if isinstance(event, BlockStored):
        return _BlockStoredArray(event.block_hashes, event.parent_block_hash, event.token_ids,
                                 event.block_size, event.lora_id, event.medium)
    if isinstance(event, BlockRemoved):
        return _BlockRemovedArray(event.block_hashes, event.medium)
    return _AllBlocksClearedArray()


def _from_array(event: Any) -> KVEvent:
    if isinstance(event, _BlockStoredArray):
        return BlockStored(event.block_hashes, event.parent_block_hash, event.token_ids,
                           event.block_size, event.lora_id, event.medium, None)
    if isinstance(event, _BlockRemovedArray):
        return BlockRemoved(event.block_hashes, event.medium)
    return AllBlocksCleared()


class BatchCodec:
    """Encodes and decodes event batches in one of ENCODINGS."""

    def __init__(self, encoding: str = "map") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"events encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch if encoding == "map" else _KVEventBatchArray)

    def encode(self, ts: float, events: list[KVEvent], data_parallel_rank: int | None = None) -> bytes:
        if self.encoding == "map":
            return self._encoder.encode(KVEventBatch(ts, list(events), data_parallel_rank))
        return self._encoder.encode(_KVEventBatchArray(ts, [_as_array(e) for e in events], data_parallel_rank))

    def decode(self, payload: bytes) -> KVEventBatch:
        """A batch, or msgspec.DecodeError / ValidationError for bytes that are not one."""
        batch = self._decoder.decode(payload)
        if self.encoding == "map":
            return batch  # type: ignore[no-any-return, return-value]
        return KVEventBatch(batch.ts, [_from_array(e) for e in batch.events], batch.data_parallel_rank)
