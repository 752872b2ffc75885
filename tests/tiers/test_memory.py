import numpy as np
import pytest

from kvtier.core.codec import checksum
from kvtier.core.config import MemoryTierConfig
from kvtier.core.errors import ConfigError
from kvtier.tiers.base import ChunkMeta
from kvtier.tiers.memory import MemoryTier
from tests.conftest import CHUNK, TINY, key_of, payload

ROOT = b"\0" * 32
LB = TINY.layer_bytes(CHUNK)


def tier(slots: int, policy: str = "lru") -> MemoryTier:
    return MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=slots * TINY.chunk_bytes(CHUNK), policy=policy))


def put(t: MemoryTier, key: bytes, parent: bytes = ROOT, depth: int = 0) -> bool:
    layers = payload(key)
    meta = ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers))
    return t.write(meta, layers)


def chain(t: MemoryTier, ids: list[int]) -> list[bytes]:
    keys = [key_of(i) for i in ids]
    parent = ROOT
    for d, k in enumerate(keys):
        assert put(t, k, parent, d)
        parent = k
    return keys


def read(t: MemoryTier, key: bytes, layers=(0, 1)):
    dests = [np.zeros(LB, np.uint8) for _ in layers]
    meta = t.read(key, list(layers), dests)
    return meta, dests


def test_roundtrip_whole_and_one_layer():
    t = tier(4)
    (k,) = chain(t, [1])
    meta, dests = read(t, k)
    assert meta is not None and meta.depth == 0
    for got, want in zip(dests, payload(k)):
        assert np.array_equal(got, want)
    meta, (one,) = read(t, k, layers=(1,))
    assert np.array_equal(one, payload(k)[1])
    assert t.metrics.get("kvtier_tier_hits_total", tier="memory") == 2


def test_capacity_never_exceeded_and_exact_lru_order():
    t = tier(4)
    a = chain(t, [1, 2])  # a0 -> a1
    b = chain(t, [3, 4])  # b0 -> b1
    t.touch(a)  # a hit on chain a touches a1, then a0: the head ends freshest
    order = []
    for i in range(5, 9):
        before = set(t.keys())
        put(t, key_of(i))
        assert t.usage().chunks <= 4 and t.usage().used_bytes <= t.usage().capacity_bytes
        order += [k for k in before if not t.contains(k)]
    assert order == [b[1], b[0], a[1], a[0]]


def test_head_never_evicted_before_tail_even_if_older():
    t = tier(3)
    a = chain(t, [1, 2, 3])  # a0 oldest by insert order, but it has children
    put(t, key_of(9))
    assert t.contains(a[0]) and t.contains(a[1]) and not t.contains(a[2])


def test_pinned_chunk_not_evicted():
    t = tier(2)
    k1, k2 = key_of(1), key_of(2)
    put(t, k1)
    put(t, k2)
    e1 = t.pin_entry(k1)
    assert e1 is not None and e1.meta.key == k1
    put(t, key_of(3))
    assert t.contains(k1) and not t.contains(k2)
    e3 = t.pin_entry(key_of(3))
    assert put(t, key_of(4)) is False  # everything pinned: no room
    t.release([e1])
    assert put(t, key_of(4)) is True and not t.contains(k1)
    with pytest.raises(ValueError, match="not pinned"):
        t.release([e1])
    t.release([e3])


def test_pin_entries_pins_a_batch_counts_nothing_and_release_frees_it():
    t = tier(2)
    k1, k2 = key_of(1), key_of(2)
    put(t, k1)
    put(t, k2)
    hits = t.metrics.snapshot()
    entries = t.pin_entries([k1, key_of(9), k1])
    assert entries[1] is None and entries[0] is entries[2] and entries[0] is not None
    assert entries[0].slot == t.slot_of(k1) and entries[0].refs == 2
    assert t.metrics.snapshot() == hits  # gather_here counts what it serves, after its checksums
    put(t, key_of(3))
    assert t.contains(k1) and not t.contains(k2)  # the pinned chunk was not the victim
    t.release(entries)
    assert entries[0].refs == 0
    put(t, key_of(4))
    assert not t.contains(k1)


def test_reservation_invisible_until_commit_and_abort_frees():
    t = tier(1)
    k = key_of(1)
    res = t.allocate(k)
    assert res is not None and not t.contains(k)
    assert t.allocate(key_of(2)) is None  # the only slot is reserved
    t.write_layer(res, 0, payload(k)[0])
    meta = ChunkMeta(k, ROOT, 0, CHUNK, (0, 0))
    with pytest.raises(ValueError, match="unfilled"):
        t.commit(res, meta)
    t.abort(res)
    assert t.allocate(key_of(2)) is not None


def test_corrupted_slot_is_a_miss_and_counted():
    t = tier(2)
    (k,) = chain(t, [1])
    t.layer_view(t.slot_of(k), 1)[5] ^= 1
    meta, _ = read(t, k)
    assert meta is None and not t.contains(k)
    assert t.metrics.get("kvtier_tier_checksum_failures_total", tier="memory") == 1


def test_bad_buffers_and_config():
    t = tier(2)
    (k,) = chain(t, [1])
    with pytest.raises(ValueError, match="bytes"):
        t.read(k, [0], [np.zeros(LB + 1, np.uint8)])
    with pytest.raises(ValueError, match="layer 5"):
        t.read(k, [5], [np.zeros(LB, np.uint8)])
    with pytest.raises(ValueError, match="read-only"):
        t.read(k, [0], [bytes(LB)])
    with pytest.raises(ConfigError, match="holds no chunk"):
        MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=10))
    with pytest.raises(ConfigError, match="policy"):
        MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=1 << 20, policy="nope"))


def test_typed_destinations_and_read_only_sources():
    """Copies go by raw address: typed multi-dimensional dests, bytes sources, slices of one array."""
    t = tier(2)
    key = key_of(7)
    layers = payload(key)
    meta = ChunkMeta(key, ROOT, 0, CHUNK, tuple(checksum(x) for x in layers))
    assert t.write(meta, [x.tobytes() for x in layers])  # read-only sources
    shape = (TINY.num_kv_heads, TINY.planes, CHUNK, TINY.head_size)
    paged = np.zeros((3, *shape), np.float32)  # one layer per block of a paged tensor, block 1 unused
    assert t.read(key, [1, 0], [paged[2], paged[0]]) is not None
    assert paged[0].tobytes() == layers[0].tobytes() and paged[2].tobytes() == layers[1].tobytes()
    assert not paged[1].any()  # nothing written outside the destinations
    with pytest.raises(ValueError, match="C-contiguous"):
        t.read(key, [0], [np.zeros((2, LB), np.uint8)[:, 0]])


# -- issue 15 -------------------------------------------------------------------------------------
def test_on_evict_runs_outside_the_lock_with_the_victims_bytes():
    """Write-back's copy of an evicted chunk used to run under the tier's lock, blocking every reader."""
    import threading

    seen = []

    def on_evict(meta, slot_bytes):
        dests = [np.zeros(LB, np.uint8) for _ in range(2)]
        reader = threading.Thread(target=lambda: seen.append(t.read(key_of(2), [0, 1], dests)))
        reader.start()
        reader.join(10)
        seen.append(("reader finished", not reader.is_alive()))
        seen.append((meta.key, bytes(slot_bytes) == b"".join(x.tobytes() for x in payload(meta.key))))

    t = MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=2 * TINY.chunk_bytes(CHUNK)), on_evict=on_evict)
    chain(t, [1])
    chain(t, [2])
    assert put(t, key_of(3))  # evicts key 1
    assert ("reader finished", True) in seen and (key_of(1), True) in seen
    assert seen[0] is not None  # the reader of key 2 got its chunk while key 1 was being copied
    assert_counts = t.slot_counts()
    assert assert_counts["resident"] == 2 and assert_counts["free"] == 0 and assert_counts["reserved"] == 0


def test_a_failing_on_evict_returns_the_slot():
    def on_evict(meta, slot_bytes):
        raise OSError("disk gone")

    t = MemoryTier(TINY, CHUNK, MemoryTierConfig(capacity_bytes=TINY.chunk_bytes(CHUNK)), on_evict=on_evict)
    chain(t, [1])
    with pytest.raises(OSError):
        put(t, key_of(2))
    assert t.slot_counts()["free"] == 1 and t.slot_counts()["reserved"] == 0


@pytest.mark.parametrize(
    ("key", "match"),
    [("ab" * 16, "must be bytes, got str"), (b"k" * 33, "has 33 bytes"), (None, "must be bytes, got NoneType")],
)
def test_bad_keys_are_refused_at_the_call_and_leak_no_slot(key, match):
    """A str key used to take a slot, then fail in the policy with the slot indexed but never
    evictable: two such calls filled a two-slot tier for good."""
    t = tier(2, policy="adaptive")
    layers = payload(key_of(1))
    for _ in range(3):
        with pytest.raises(ValueError, match=match):
            t.write(ChunkMeta(key, ROOT, 0, CHUNK, tuple(checksum(x) for x in layers)), layers)
        with pytest.raises(ValueError, match=match):
            t.allocate(key, ROOT, 0)
    with pytest.raises(ValueError, match="must be bytes"):
        read(t, "ab" * 16)
    assert t.slot_counts()["free"] == 2
    chain(t, [1, 2])
    assert t.lookup([key_of(1), key_of(2)]) == 2


def test_write_layer_outside_the_layout_is_refused_not_written_into_the_next_slot():
    t = tier(2)
    res = t.allocate(key_of(2), ROOT, 0)  # slot 0
    (a,) = chain(t, [1])  # slot 1, right after it
    with pytest.raises(ValueError, match="layer 2 is outside 0..1"):
        t.write_layer(res, 2, payload(key_of(2))[0])
    with pytest.raises(ValueError, match="outside"):
        t.write_layer(res, -1, payload(key_of(2))[0])
    meta, dests = read(t, a)
    assert meta is not None
    for got, want in zip(dests, payload(a)):
        assert np.array_equal(got, want)
    t.abort(res)


def test_a_read_racing_a_borrow_that_condemns_the_chunk_frees_its_slot(monkeypatch):
    """Bug: read() dropped its reference without the condemned check release() makes, so a
    borrower that condemned the chunk and released first left its slot out of the pool for good."""
    import threading

    import kvtier.tiers.memory as memmod

    t = tier(2)
    k = key_of(0)
    put(t, k)
    in_copy, go_on = threading.Event(), threading.Event()
    real_copy = memmod.copy_memory

    def held_copy(dst, src, n):  # the reader is inside its copy
        in_copy.set()
        assert go_on.wait(5)
        real_copy(dst, src, n)

    monkeypatch.setattr(memmod, "copy_memory", held_copy)
    reader = threading.Thread(target=t.read, args=(k, [0, 1], [np.zeros(LB, np.uint8) for _ in range(2)]))
    reader.start()
    assert in_copy.wait(5)
    monkeypatch.setattr(memmod, "copy_memory", real_copy)
    (entry,) = t.borrow([k])
    t.pool_array()[entry.slot * t.chunk_bytes] ^= 0xFF
    assert not t.verify_borrowed(entry, [0])
    t.release([entry])
    go_on.set()
    reader.join(5)
    assert t.slot_counts() == {"slots": 2, "free": 2, "reserved": 0, "resident": 0, "pinned": 0}


def test_a_read_that_fails_its_checksum_condemns_the_chunk_even_while_pinned():
    t = tier(2)
    k = key_of(0)
    put(t, k)
    pin = t.pin_entry(k)  # a lease holds it
    assert pin is not None
    t.pool_array()[pin.slot * t.chunk_bytes + 3] ^= 0xFF
    assert t.read(k, [0, 1], [np.zeros(LB, np.uint8) for _ in range(2)]) is None
    assert not t.contains(k)  # before: a pinned chunk stayed indexed, found by every lookup
    put(t, k)  # saved again, in another slot: the old entry's pin is still out
    t.release([pin])  # the lease ends: the pin goes back to the entry it was taken on
    counts = t.slot_counts()
    assert counts == {"slots": 2, "free": 1, "reserved": 0, "resident": 1, "pinned": 0}
    out = [np.zeros(LB, np.uint8) for _ in range(2)]
    assert t.read(k, [0, 1], out) is not None and all(np.array_equal(o, p) for o, p in zip(out, payload(k)))
