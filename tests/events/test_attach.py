"""attach() lists a tier that keeps storing and evicting meanwhile: each chunk is counted once, so
each one stored is announced once and its eviction is announced."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.keys import chunk_keys
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventPublisher, block_hash_of
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY, payload
from tests.events.helpers import ROOT, ipc_config


def memory_store(chunks: int = 8) -> TieredStore:
    return TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(
        capacity_bytes=chunks * TINY.chunk_bytes(CHUNK))), TINY)


def save(store: TieredStore, keys: list[bytes]) -> None:
    store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()


def fold(events: Iterable[object], medium: str = "CPU") -> set[int | bytes]:
    """What a subscriber applying `events` in order holds on `medium`."""
    held: set[int | bytes] = set()
    for e in events:
        if isinstance(e, BlockStored) and e.medium == medium:
            held.update(e.block_hashes)
        elif isinstance(e, BlockRemoved) and e.medium == medium:
            held.difference_update(e.block_hashes)
        elif isinstance(e, AllBlocksCleared):
            held.clear()
    return held


@pytest.fixture
def publisher(tmp_path):
    pub = KVEventPublisher(ipc_config(tmp_path))
    seen: list[object] = []
    pub._put = seen.append  # type: ignore[method-assign]  # noqa: SLF001 - the events as the changes produce them
    yield pub, seen
    pub.close()


def test_a_chunk_stored_while_attach_lists_the_tier_is_counted_once(publisher, monkeypatch):
    """Bug: the observer went in before the listing, so a chunk stored in between was counted by both:
    two holders for one tier, and its eviction (one holder less) was never published."""
    pub, seen = publisher
    store = memory_store()
    tier = store.memory
    assert tier is not None
    try:
        save(store, chunk_keys(ROOT, list(range(CHUNK)), CHUNK))
        late = chunk_keys(ROOT, [7] * CHUNK, CHUNK)
        listing = tier.keys

        def keys_while_a_save_lands() -> list[bytes]:
            save(store, late)  # after the observer is installed, before the tier is listed
            return listing()

        monkeypatch.setattr(tier, "keys", keys_while_a_save_lands)
        pub.attach(tier)
        monkeypatch.undo()
        h = block_hash_of(late[0])
        assert sum(h in e.block_hashes for e in seen if isinstance(e, BlockStored)) == 1  # announced once
        assert fold(seen) == {block_hash_of(k) for k in tier.keys()}
        assert tier.delete(late[0])
        assert [e.block_hashes for e in seen if isinstance(e, BlockRemoved)] == [[h]]  # and its eviction too
        assert h not in fold(seen)
    finally:
        store.close()


def test_a_chunk_evicted_while_attach_reads_the_listing_is_not_left_announced(publisher, monkeypatch):
    """Bug: an eviction heard while attach() was still going through the listing was published first,
    and the listing then announced the chunk as stored: subscribers kept a chunk the tier had dropped."""
    pub, seen = publisher
    store = memory_store()
    tier = store.memory
    assert tier is not None
    try:
        keys = chunk_keys(ROOT, list(range(3 * CHUNK)), CHUNK)
        save(store, keys)
        victim = keys[-1]
        read_section = tier.read_section

        def read_then_evict(key: bytes, kind: int, index: int) -> bytes | None:
            section = read_section(key, kind, index)
            if key == victim and tier.contains(victim):
                assert tier.delete(victim)  # the tier drops it while attach() is between listing and announcing
            return section

        monkeypatch.setattr(tier, "read_section", read_then_evict)
        pub.attach(tier)
        monkeypatch.undo()
        assert not tier.contains(victim)
        assert fold(seen) == {block_hash_of(k) for k in keys[:-1]}
    finally:
        store.close()


def test_two_storage_tiers_attached_while_saving_end_with_what_they_hold(tmp_path, publisher, monkeypatch):
    """The per-medium holder count stays exact when a chunk reaches a second STORAGE tier during the
    listing of the first: dropped from one it stays announced; dropped from both it is removed."""
    from kvtier.core.config import LowerTierConfig

    pub, seen = publisher
    cfg = StoreConfig(chunk_tokens=CHUNK, memory=None,
                      disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 24),
                      lower_tiers=(LowerTierConfig(name="l2", disk=DiskTierConfig(root=str(tmp_path / "l2"),
                                                                                   capacity_bytes=1 << 24)),))
    store = TieredStore(cfg, TINY)
    try:
        disk, l2 = store.disk, store.lower_tiers[0]
        assert disk is not None
        first = chunk_keys(ROOT, list(range(CHUNK)), CHUNK)
        save(store, first)
        store.flush()
        store.wait_lower(first, 10)
        late = chunk_keys(ROOT, [9] * CHUNK, CHUNK)
        listing = disk.keys

        def keys_while_a_save_lands() -> list[bytes]:
            save(store, late)
            store.flush()
            store.wait_lower(late, 10)
            return listing()

        monkeypatch.setattr(disk, "keys", keys_while_a_save_lands)
        pub.attach_store(store)
        monkeypatch.undo()
        h = block_hash_of(late[0])
        storage = fold(seen, "STORAGE")
        assert storage == {block_hash_of(first[0]), h}
        assert disk.delete(late[0])
        assert h in fold(seen, "STORAGE")  # l2 still holds it
        assert l2.delete(late[0])
        assert fold(seen, "STORAGE") == {block_hash_of(first[0])}
    finally:
        store.close()


def test_a_chunk_another_tier_drops_during_the_listing_is_read_without_holding_up_the_observer(
        tmp_path, publisher, monkeypatch):
    """A chunk listed while another STORAGE tier held it is not read then; if that tier drops it
    before the listing is announced it is read late, and a read that drops it (as a corrupt chunk
    is dropped) tells the observer on the same thread: attach() must not wait on itself."""
    import threading

    from kvtier.core.config import LowerTierConfig

    pub, seen = publisher
    cfg = StoreConfig(chunk_tokens=CHUNK, memory=None,
                      disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 24),
                      lower_tiers=(LowerTierConfig(name="l2", disk=DiskTierConfig(root=str(tmp_path / "l2"),
                                                                                   capacity_bytes=1 << 24)),))
    store = TieredStore(cfg, TINY)
    try:
        disk, l2 = store.disk, store.lower_tiers[0]
        assert disk is not None
        shared, only_l2 = chunk_keys(ROOT, [1] * CHUNK, CHUNK)[0], chunk_keys(ROOT, [2] * CHUNK, CHUNK)[0]
        for key in (shared, only_l2):
            save(store, [key])
        store.flush()
        store.wait_lower([shared, only_l2], 10)
        assert disk.delete(only_l2)
        pub.attach(disk)  # announces `shared`
        read_section = l2.read_section

        def reading(key: bytes, kind: int, index: int) -> bytes | None:
            if key == only_l2:
                assert disk.delete(shared)  # after `shared` was listed as held elsewhere
            elif key == shared:
                assert l2.delete(shared)  # the late read finds it corrupt and drops it
                return None
            return read_section(key, kind, index)

        monkeypatch.setattr(l2, "keys", lambda: [shared, only_l2])
        monkeypatch.setattr(l2, "read_section", reading)
        attaching = threading.Thread(target=pub.attach, args=(l2,), daemon=True)
        attaching.start()
        attaching.join(10)
        assert not attaching.is_alive(), "attach() waits on the observer it installed"
        monkeypatch.undo()
        assert not l2.contains(shared) and not disk.contains(shared)
        assert fold(seen, "STORAGE") == {block_hash_of(only_l2)}
    finally:
        store.close()
