"""StoreHost on tiny pools, in one process: exact slot accounting, leases, owners."""

import pytest

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.service.host import NO_SLOT, StoreHost
from kvtier.service.protocol import LeaseError, ServiceError
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY, payload

ROOT = Namespace("host-test", TINY.layout_id(CHUNK)).root()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(slots=4, disk_root=None, clock=None):
    cfg = StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=slots * TINY.chunk_bytes(CHUNK)),
                      disk=DiskTierConfig(root=str(disk_root), capacity_bytes=1 << 30) if disk_root else None)
    store = TieredStore(cfg, TINY)
    return store, StoreHost(store, clock=clock or Clock())


def keys(n, start=0):
    return chunk_keys(ROOT, list(range(start, start + n * CHUNK)), CHUNK)


def fill(host, owner, ks, parent=ROOT):
    alloc = host.allocate(owner, ks, parent, 0)
    mem = host.memory
    for key, slot in zip(ks, alloc.slots, strict=True):
        if slot != NO_SLOT:
            for layer, data in enumerate(payload(key)):
                mem.layer_view(slot, layer)[:] = data
    return host.commit(owner, alloc.save_id)[0]


def on_disk_only(host, store, ks):
    """Save `ks`, wait for their disk writes, then drop them from DRAM: every one is a disk hit."""
    fill(host, 1, ks)
    store.flush()
    for k in ks:
        store.memory.delete(k)


def hold_disk_reads(store, held=lambda key: True):
    """Hold every promotion's read of a chunk `held` accepts until the returned event is set; the
    keys whose reads started are appended to the returned list (the read side of _gate_disk_writes)."""
    import threading

    gate, started = threading.Event(), []
    real = store.read_lower

    def read(key, layers, dests):
        started.append(key)
        if held(key):
            assert gate.wait(10)
        return real(key, layers, dests)

    store.read_lower = read
    return gate, started


def test_lease_blocks_eviction_until_released():
    store, host = make(slots=4)
    a = keys(2)
    fill(host, 1, a)
    hits, tiers, lease = host.lookup(1, a, lease=True)
    assert hits == 2 and tiers == ["memory", "memory"] and lease is not None
    for i in range(3):
        fill(host, 2, keys(2, start=1000 * (i + 1)))
    assert store.memory.lookup(a) == 2  # leased: survived 6 newer chunks in 4 slots
    host.release(lease)
    with pytest.raises(LeaseError):
        host.release(lease)
    fill(host, 2, keys(4, start=9000))
    assert store.memory.lookup(a) == 0
    assert store.memory.slot_counts() == {"slots": 4, "free": 0, "reserved": 0, "resident": 4, "pinned": 0}


def test_lease_expires():
    clock = Clock()
    store, host = make(clock=clock)
    a = keys(2)
    fill(host, 1, a)
    _, _, lease = host.lookup(1, a, lease=True, lease_s=5)
    clock.now += 4.9
    assert host.expire() == 0
    clock.now += 0.2
    assert host.expire() == 1
    assert store.memory.slot_counts()["pinned"] == 0
    with pytest.raises(LeaseError):
        host.release(lease)


def test_lease_of_unknown_key_is_an_error_and_leases_nothing():
    store, host = make()
    a = keys(2)
    fill(host, 1, a[:1])
    with pytest.raises(ServiceError) as e:
        host.lease(1, a)
    assert e.value.kind == "unknown_key"
    assert store.memory.slot_counts()["pinned"] == 0 and host.counts()["leases"] == 0


def test_drop_owner_returns_everything():
    store, host = make(slots=8)
    a = keys(3)
    fill(host, 1, a)
    before = store.memory.slot_counts()
    host.lookup(7, a, lease=True)
    host.load_begin(7, a)
    host.allocate(7, keys(3, start=500), ROOT, 0)
    c = store.memory.slot_counts()
    assert c["pinned"] == 3 and c["reserved"] == 3
    host.drop_owner(7)
    assert store.memory.slot_counts() == before
    assert host.counts() == {"leases": 0, "loads": 0, "saves": 0}


def test_two_writers_same_key_stored_once():
    store, host = make(slots=8)
    a = keys(2)
    x = host.allocate(1, a, ROOT, 0)
    y = host.allocate(2, a, ROOT, 0)
    assert NO_SLOT not in x.slots and NO_SLOT not in y.slots
    for alloc in (x, y):
        for key, slot in zip(a, alloc.slots, strict=True):
            for layer, data in enumerate(payload(key)):
                store.memory.layer_view(slot, layer)[:] = data
    host.commit(1, x.save_id)
    host.commit(2, y.save_id)
    assert store.memory.slot_counts() == {"slots": 8, "free": 6, "reserved": 0, "resident": 2, "pinned": 0}
    z = host.allocate(3, a, ROOT, 0)  # already stored: nothing to write
    assert z.slots == [NO_SLOT, NO_SLOT] and z.granted == 2
    host.abort(3, z.save_id)


def test_save_and_load_ids_belong_to_their_owner():
    store, host = make()
    alloc = host.allocate(1, keys(1), ROOT, 0)
    with pytest.raises(ServiceError):
        host.commit(2, alloc.save_id)
    pins = host.load_begin(1, keys(1))
    assert pins.slots == [NO_SLOT]
    with pytest.raises(ServiceError):
        host.load_end(2, pins.load_id)
    host.load_end(1, pins.load_id)
    host.abort(1, alloc.save_id)


def test_no_room_grants_a_prefix():
    store, host = make(slots=2)
    a = keys(2)
    fill(host, 1, a)
    host.lookup(1, a, lease=True)  # both slots pinned
    alloc = host.allocate(2, keys(2, start=100), ROOT, 0)
    assert alloc.granted == 0 and alloc.slots == [NO_SLOT, NO_SLOT]
    result, _ = host.commit(2, alloc.save_id)
    assert result.in_memory == 0 and result.errors


def test_lease_promotes_disk_hits_into_dram(tmp_path):
    store, host = make(slots=2, disk_root=tmp_path / "disk")
    a = keys(4)
    fill(host, 1, a[:2])
    store.flush()  # chunks are pinned until their disk write is done
    fill(host, 1, a[2:], parent=a[1])
    store.flush()
    assert store.memory.lookup(a) == 0 and store.disk.lookup(a) == 4
    hits, tiers, lease = host.lookup(1, a[:2], lease=True)
    assert hits == 2 and tiers == ["disk", "disk"]
    pins = host.load_begin(1, a[:2], lease)
    assert NO_SLOT not in pins.slots
    for key, slot in zip(a[:2], pins.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            assert bytes(store.memory.layer_view(slot, layer)) == data.tobytes()
    host.load_end(1, pins.load_id)
    host.release(lease)
    assert store.memory.slot_counts()["pinned"] == 0
    host.close()
    store.close()


def test_release_does_not_wait_for_the_leases_disk_promotions(tmp_path):
    """Bug: release() waited for every disk promotion its lookup had started. The vLLM scheduler
    releases the hits its load planner chose to recompute, so with a slow disk each request
    waited for the reads it had decided against (kvtier bench vllm's kvtier_disk_slow: 2.2 s
    TTFT against 0.11 s recomputing). Now promotions not started are cancelled, and one under
    way unpins its chunk when its read ends."""
    import threading
    import time

    store, host = make(slots=8, disk_root=tmp_path / "disk")
    a = keys(6)
    on_disk_only(host, store, a)
    gate, started = hold_disk_reads(store)
    threads = host._promoter._max_workers  # noqa: SLF001 - how many promotions run at once
    assert threads < 6
    hits, tiers, lease = host.lookup(2, a, lease=True)
    assert hits == 6 and tiers == ["disk"] * 6
    deadline = time.monotonic() + 10
    while len(started) < threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(started) == threads  # every promotion thread is inside a held disk read
    releaser = threading.Thread(target=host.release, args=(lease,))
    releaser.start()
    releaser.join(5)
    assert not releaser.is_alive()  # returned with the reads still held
    gate.set()
    host._promoter.shutdown(wait=True)  # noqa: SLF001 - the running promotions end
    assert len(started) == threads  # the queued ones were cancelled: never read
    assert store.memory.slot_counts()["pinned"] == 0  # the finished ones unpinned their chunks
    assert store.memory.lookup(a[:threads]) == threads  # and left them promoted in DRAM
    store.close()


def test_a_load_of_part_of_a_lease_waits_only_for_its_own_promotions(tmp_path):
    """Bug: load_begin waited for every promotion of the lease. vLLM's load planner loads the
    leading hits and recomputes the slow rest, so the load waited for reads it would never use
    (kvtier bench vllm's kvtier_disk_slow: one request at 1.15 s against 0.11 s)."""
    import threading

    store, host = make(slots=8, disk_root=tmp_path / "disk")
    a = keys(3)
    on_disk_only(host, store, a)
    gate, _started = hold_disk_reads(store, lambda key: key == a[2])  # the hit the planner does not load
    hits, tiers, lease = host.lookup(2, a, lease=True)
    assert hits == 3 and tiers == ["disk"] * 3
    out = {}
    loader = threading.Thread(target=lambda: out.setdefault("pins", host.load_begin(2, a[:2], lease)))
    loader.start()
    loader.join(5)
    assert not loader.is_alive()  # did not wait for a[2]'s held read
    pins = out["pins"]
    assert NO_SLOT not in pins.slots
    for key, slot in zip(a[:2], pins.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            assert bytes(store.memory.layer_view(slot, layer)) == data.tobytes()
    host.load_end(2, pins.load_id)
    host.release(lease)
    gate.set()
    host.close()
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_trim_ends_the_dropped_keys_pins_and_promotions_and_keeps_the_rest(tmp_path):
    store, host = make(slots=8, disk_root=tmp_path / "disk")
    a = keys(5)
    on_disk_only(host, store, a[2:])  # a[0:2] in DRAM, a[2:5] on disk
    fill(host, 1, a[:2])
    store.flush()  # their disk writes done: no write pins them
    gate, started = hold_disk_reads(store)
    host._promoter.shutdown(wait=True)  # noqa: SLF001 - one promotion at a time: the rest queue
    from concurrent.futures import ThreadPoolExecutor
    host._promoter = ThreadPoolExecutor(1)  # noqa: SLF001
    hits, tiers, lease = host.lookup(2, a, lease=True)
    assert hits == 5 and tiers == ["memory"] * 2 + ["disk"] * 3
    assert host.trim(lease, [a[1], a[3], a[4]]) == 3  # one DRAM pin, two promotions (a[3] queued or running)
    assert store.memory.slot_counts()["pinned"] == 1  # a[0]; a[2]'s promotion pins once its read ends
    gate.set()
    host._promoter.shutdown(wait=True)  # noqa: SLF001
    assert a[4] not in started  # cancelled before it read
    assert store.memory.slot_counts()["pinned"] == 2  # a[0] and the promoted a[2]: the lease's rest
    pins = host.load_begin(2, [a[0], a[2]], lease)
    assert NO_SLOT not in pins.slots
    host.load_end(2, pins.load_id)
    host.release(lease)
    assert store.memory.slot_counts()["pinned"] == 0
    with pytest.raises(LeaseError):
        host.trim(lease, a)
    host.close()
    store.close()


def test_a_second_commit_of_a_resident_key_writes_disk_with_the_resident_bytes_checksums(tmp_path):
    """Bug: a commit that found its key already published (another engine saved the same prefix,
    its KV differing in the low bits) handed its own checksums to the disk write, which paired
    them with the resident chunk's bytes: the disk copy never verified, and the chunk was lost
    once DRAM let it go."""
    import threading

    import numpy as np

    store, host = make(slots=8, disk_root=tmp_path)
    mem = host.memory
    k, k2 = keys(2)
    a = host.allocate(1, [k, k2], ROOT, 0)  # engine A saves [k, k2]
    b = host.allocate(2, [k], ROOT, 0)  # engine B saves [k]
    for slot in a.slots:
        for layer in range(TINY.num_layers):
            mem.layer_view(slot, layer)[:] = 1
    for layer in range(TINY.num_layers):
        mem.layer_view(b.slots[0], layer)[:] = 2
    real, in_a, go = mem.layer_checksums, threading.Event(), threading.Event()

    def slow(res):  # A is still checksumming k2 when B commits k
        if res.key == k2:
            in_a.set()
            assert go.wait(5)
        return real(res)

    mem.layer_checksums = slow
    t = threading.Thread(target=host.commit, args=(1, a.save_id))
    t.start()
    assert in_a.wait(5)  # A's k is published
    host.commit(2, b.save_id)  # B's k: already resident, B's slot freed
    go.set()
    t.join()
    store.flush()
    for key in (k2, k):
        assert mem.delete(key)
    out = [np.zeros(TINY.layer_bytes(CHUNK), np.uint8) for _ in range(TINY.num_layers)]
    assert store.disk.read(k, list(range(TINY.num_layers)), out) is not None
    assert all((o == 1).all() for o in out)  # A's bytes, under A's checksums
    host.close()
    store.close()


def _gate_disk_writes(store):
    """Hold every disk write until the returned event is set."""
    import threading

    gate = threading.Event()
    real = store.disk.write

    def slow_write(meta, layers):
        assert gate.wait(10)
        return real(meta, layers)

    store.disk.write = slow_write
    return gate


def test_save_larger_than_dram_waits_for_disk_writes_instead_of_dropping(tmp_path):
    """Bug: DRAM smaller than a burst of saves, write-through disk. Chunks stay pinned until
    their disk write lands, so a save arriving while the writer was behind got only the few
    unpinned slots (granted < len) and the rest of the document was never stored anywhere
    (in `kvtier bench vllm`'s kvtier_disk, 2 of 4 documents had few or no disk hits)."""
    import threading

    store, host = make(slots=4, disk_root=tmp_path / "disk")
    gate = _gate_disk_writes(store)
    first, second = keys(4), keys(4, start=5000)
    assert fill(host, 1, first).in_memory == 4  # all 4 slots pinned until written
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("alloc", host.allocate(1, second, ROOT, 0)))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waits for the writer rather than granting nothing
    gate.set()
    t.join(10)
    alloc = out["alloc"]
    assert alloc.granted == 4 and NO_SLOT not in alloc.slots
    host.abort(1, alloc.save_id)
    fill(host, 1, second)
    store.flush()
    assert store.disk.lookup(first) == 4 and store.disk.lookup(second) == 4
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_disk_hit_promotion_waits_for_disk_writes_instead_of_failing(tmp_path):
    """Bug (same cause): a load of disk hits while DRAM was full of chunks awaiting their disk
    write could not promote them (no slot) and failed them, though the writer frees slots soon."""
    store, host = make(slots=4, disk_root=tmp_path / "disk")
    old, new = keys(4), keys(4, start=5000)
    on_disk_only(host, store, old)
    gate = _gate_disk_writes(store)
    fill(host, 1, new)  # 4 slots pinned by queued writes
    import threading

    threading.Timer(0.3, gate.set).start()
    hits, tiers, lease = host.lookup(2, old, lease=True)
    assert hits == 4 and tiers == ["disk"] * 4
    pins = host.load_begin(2, old, lease)
    assert NO_SLOT not in pins.slots  # promoted by the lease once the writer freed slots
    host.load_end(2, pins.load_id)
    host.release(lease)
    store.flush()
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_commit_pins_chunks_before_another_thread_can_evict_them(tmp_path):
    """Bug: commit published chunk i unpinned, checksummed chunks i+1.., and only then pinned
    them all for the disk write; an allocation on another thread in between evicted chunk i,
    whose disk write then failed with every chunk after it ("evicted from DRAM before its
    disk write")."""
    store, host = make(slots=4, disk_root=tmp_path / "disk")
    store.write_wait_s = 0.0
    ks = keys(3)
    alloc = host.allocate(1, ks, ROOT, 0)
    for key, slot in zip(ks, alloc.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            host.memory.layer_view(slot, layer)[:] = data
    real = host.memory.layer_checksums
    intruders = []

    def checksums_with_intruder(res):
        if res.key == ks[2]:  # chunks 0 and 1 are published by now: another client allocates
            intruders.append(host.allocate(2, keys(2, start=7000), ROOT, 0))
        return real(res)

    host.memory.layer_checksums = checksums_with_intruder
    result, handle = host.commit(1, alloc.save_id)
    assert handle.wait().on_disk == 3 and not handle.wait().errors
    assert intruders[0].granted == 1  # the one free slot; committed chunks were not evicted
    assert store.disk.lookup(ks) == 3
    host.abort(2, intruders[0].save_id)
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_load_pins_and_save_slots_expire_with_the_lease_bound_while_the_owner_stays():
    """A stalled client that keeps its connection must not pin the pool for good (issue 15)."""
    clock = Clock()
    store, host = make(slots=8, clock=clock)
    a = keys(3)
    fill(host, 1, a)
    before = store.memory.slot_counts()
    pins = host.load_begin(7, a, hold_s=5)
    alloc = host.allocate(7, keys(3, start=500), ROOT, 0, hold_s=5)
    assert pins.hold_s == 5 and alloc.hold_s == 5
    c = store.memory.slot_counts()
    assert c["pinned"] == 3 and c["reserved"] == 3
    clock.now += 4.9
    assert host.expire() == 0
    clock.now += 0.2
    assert host.expire() == 2
    assert store.memory.slot_counts() == before  # owner 7 is still "connected"
    with pytest.raises(ServiceError) as e:
        host.load_end(7, pins.load_id)
    assert e.value.kind == "unknown_load"
    with pytest.raises(ServiceError) as e:
        host.commit(7, alloc.save_id)
    assert e.value.kind == "unknown_save"


def test_a_renewed_save_keeps_its_slots_past_its_first_hold():
    """A live client whose forward outlasts one hold renews its save as it writes: the slots stay
    reserved and the commit publishes; another owner cannot renew it, and an expired one is gone."""
    clock = Clock()
    store, host = make(slots=8, clock=clock)
    ks = keys(3, start=800)
    alloc = host.allocate(7, ks, ROOT, 0, hold_s=5)
    for _ in range(3):  # 15 s in all, three times the hold
        clock.now += 4
        assert host.renew_save(7, alloc.save_id, hold_s=5) == 5
        assert host.expire() == 0
    with pytest.raises(ServiceError) as e:
        host.renew_save(8, alloc.save_id, hold_s=5)  # not this owner's save
    assert e.value.kind == "unknown_save"
    mem = host.memory
    for key, slot in zip(ks, alloc.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            mem.layer_view(slot, layer)[:] = data
    assert host.commit(7, alloc.save_id)[0].in_memory == 3
    late = host.allocate(7, keys(2, start=900), ROOT, 0, hold_s=5)
    clock.now += 5.1
    assert host.expire() == 1
    with pytest.raises(ServiceError) as e:
        host.renew_save(7, late.save_id, hold_s=5)  # too late: its slots went back
    assert e.value.kind == "unknown_save"
    assert store.memory.slot_counts()["reserved"] == 0


def test_hold_is_capped_by_max_lease_and_must_be_positive():
    store, host = make()
    host.max_lease_s = 2.0
    assert host.load_begin(1, keys(1), hold_s=100).hold_s == 2.0
    with pytest.raises(ServiceError, match="hold_s"):
        host.allocate(1, keys(1), ROOT, 0, hold_s=0)


def test_failed_disk_writes_are_reported_to_their_owner_once(tmp_path):
    import os
    import shutil

    store, host = make(slots=8, disk_root=tmp_path)
    ok = fill(host, 1, keys(2))
    assert ok.errors == ()
    assert host.take_disk_errors(1, wait=True) == []
    tmp_dir = os.path.join(str(tmp_path), "tmp")
    shutil.rmtree(tmp_dir)
    open(tmp_dir, "w").close()  # the disk fails: no temporary file can be created
    fill(host, 1, keys(2, start=100))
    fill(host, 2, keys(2, start=200))
    errors = host.take_disk_errors(1, wait=True)
    assert len(errors) == 1 and errors[0].startswith("disk write of save") and "failed" in errors[0]
    assert host.take_disk_errors(1, wait=True) == []  # once
    assert len(host.take_disk_errors(2, wait=True)) == 1  # the other owner's own failure, not owner 1's
    store.close()


def test_allocate_waits_for_free_slots_no_longer_than_asked(tmp_path):
    """A client gives up after its request timeout: the service grants a shorter chain instead of waiting."""
    store, host = make(slots=2, disk_root=tmp_path)
    store.write_wait_s = 30.0
    a = keys(2)
    held = host.allocate(1, a, ROOT, 0)  # both slots reserved, none pinned for a disk write
    assert held.granted == 2
    store._write_pins = 1  # a disk write in flight would free a slot: allocate_memory would wait for it
    alloc = host.allocate(2, keys(2, start=100), ROOT, 0, wait_s=0.2)
    assert alloc.granted == 0
    store._write_pins = 0
    host.abort(1, held.save_id)
    host.abort(2, alloc.save_id)
    store.close()


def test_metrics_are_recorded_once_per_batch_per_tier(tmp_path):
    """A lookup DRAM answers whole, one that reaches the disk, and loads from each: one latency
    observation per tier per batch, and counts added once per batch with the batch's numbers."""
    from kvtier.core import metrics as m

    store, host = make(slots=2, disk_root=tmp_path / "disk")
    a = keys(4)
    fill(host, 1, a[:2])
    store.flush()
    fill(host, 1, a[2:], parent=a[1])
    store.flush()  # DRAM holds a[2:], the disk all four
    get = store.metrics.get
    assert host.lookup(1, a[2:])[:2] == (2, ["memory", "memory"])
    assert get(m.LOOKUP_LATENCY + "_count", tier="memory") == 1
    assert get(m.LOOKUP_LATENCY + "_count", tier="disk") == 0
    assert host.lookup(1, a)[:2] == (4, ["disk", "disk", "memory", "memory"])
    assert get(m.LOOKUP_LATENCY + "_count", tier="memory") == 2
    assert get(m.LOOKUP_LATENCY + "_count", tier="disk") == 1

    pins = host.load_begin(1, a[2:])
    host.load_end(1, pins.load_id)
    assert get(m.HITS, tier="memory") == 2 and get(m.MISSES, tier="memory") == 0
    assert get(m.BYTES_READ, tier="memory") == 2 * store.memory.chunk_bytes
    assert get(m.SERVED_TOKENS, tier="memory") == 2 * CHUNK
    assert get(m.LOAD_LATENCY + "_count", tier="memory") == 1

    pins = host.load_begin(1, a[:2])  # DRAM misses, promoted from the disk
    assert pins.tiers == ["disk", "disk"]
    host.load_end(1, pins.load_id)
    assert get(m.HITS, tier="memory") == 2 and get(m.MISSES, tier="memory") == 2
    assert get(m.SERVED_TOKENS, tier="disk") == 2 * CHUNK and get(m.SERVED_TOKENS, tier="memory") == 2 * CHUNK
    assert get(m.LOAD_LATENCY + "_count", tier="disk") == 1
    assert get(m.LOAD_LATENCY + "_count", tier="memory") == 2  # the copies out of DRAM: begin to end
    host.close()
    store.close()


def test_wait_lower_waits_for_saves_in_progress_of_those_keys(tmp_path):
    """A GPU worker commits a step's saves after vLLM may have finished the request: a producer's
    wait for its handoff's chunks (wait_lower) covers a save allocated and not yet committed."""
    import threading

    from kvtier.core.config import LowerTierConfig

    cfg = StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=8 * TINY.chunk_bytes(CHUNK)),
                      lower_tiers=(LowerTierConfig(name="shared", disk=DiskTierConfig(root=str(tmp_path / "shared"),
                                                                                    capacity_bytes=1 << 30)),))
    store = TieredStore(cfg, TINY)
    clock = Clock()
    host = StoreHost(store, clock=clock)
    a, other = keys(3), keys(1, start=900)
    alloc = host.allocate(1, a, ROOT, 0)
    assert host.wait_lower(a, 0.0) == 3 and host.wait_lower(other, 0.0) == 0  # being saved; not
    out = {}
    waiter = threading.Thread(target=lambda: out.setdefault("pending", host.wait_lower(a, 30.0)))
    waiter.start()
    for key, slot in zip(a, alloc.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            host.memory.layer_view(slot, layer)[:] = data
    host.commit(1, alloc.save_id)
    waiter.join()
    assert out["pending"] == 0 and store.lower_tiers[0].lookup(a) == 3  # committed and written
    # an aborted save, an expired one and a dropped owner's end the wait too
    host.abort(1, host.allocate(1, other, ROOT, 0).save_id)
    host.allocate(2, other, ROOT, 0, hold_s=5)
    clock.now += 10
    assert host.expire() == 1 and host.wait_lower(other, 0.0) == 0
    host.allocate(3, other, ROOT, 0)
    assert host.wait_lower(other, 0.0) == 1
    host.drop_owner(3)
    assert host.wait_lower(other, 0.0) == 0
    with pytest.raises(ValueError, match="timeout_s"):
        host.wait_lower(a, -1.0)
    host.close()
    store.close()
