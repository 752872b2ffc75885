"""Regression: a lower tier written through the store did not get a chunk's missing ancestors the
way the disk tier does (TieredStore._write_ancestors). A save whose parent a lower tier had lost
(evicted there, while DRAM or the disk still held it) was refused by a folder ("not admitted") and
written by Redis as an orphan no lookup could reach (tests/tiers/test_redis_ancestors.py). Now the
ancestors the tier lacks are written first, head first, from DRAM, the write-back queue or the
disk tier; where none of them holds one, that tier's chain is not written.
"""

from __future__ import annotations

import pytest

from kvtier.core import metrics as m
from kvtier.core.codec import SECTION_SUMMARY
from kvtier.tiers.base import TierWriteError
from tests.conftest import payload
from tests.store.test_lower_tiers import ROOT, assert_exact, folder, keys_for, load, make_store


def save(store, keys, parent=ROOT, depth=0, extras=None):
    return store.save(keys, parent, depth, [payload(k) for k in keys], extras)


def summary(key: bytes) -> bytes:
    return b"summary of " + key


def test_a_lower_tier_gets_the_ancestors_it_lost_from_dram(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1", "l1")])
    lower = store.lower_tiers[0]
    keys = keys_for(5)
    save(store, keys[:3]).wait()
    store.flush()
    assert lower.delete(keys[2]) and lower.delete(keys[1])  # evicted there; DRAM still holds them
    result = save(store, keys[3:], keys[2], 3).wait()  # raised "chunk 0 not admitted" before
    assert result.chunks == 2 and lower.lookup(keys) == 5
    assert store.metrics.get(m.WRITES_REFUSED, tier="l1") == 0
    store.close()
    reader = make_store(tmp_path, [folder(tmp_path / "l1", "l1")])  # another host, that tier alone
    res, dests = load(reader, keys)
    assert res.loaded == 5 and res.tiers == ("l1",) * 5
    assert_exact(keys, dests)
    reader.close()


def test_a_lower_tier_gets_the_ancestors_it_lost_from_the_disk_tier_with_their_extras(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1", "l1")], mem_chunks=0, disk=True)  # no DRAM
    lower = store.lower_tiers[0]
    keys = keys_for(4, salt=1)
    save(store, keys[:2], extras=[((SECTION_SUMMARY, 0, summary(k)),) for k in keys[:2]]).wait()
    store.flush()
    assert lower.delete(keys[1]) and lower.delete(keys[0])
    save(store, keys[2:], keys[1], 2).wait()  # (the disk tier's write: the lower one may still run)
    assert store.wait_lower(keys, 10) == 0
    assert lower.lookup(keys) == 4 and store.metrics.get(m.WRITE_FAILURES, tier="l1") == 0
    for k in keys[:2]:  # copied whole: the sections beside the KV came along
        assert lower.read_section(k, SECTION_SUMMARY, 0) == summary(k)
    store.close()
    reader = make_store(tmp_path / "b", [folder(tmp_path / "l1", "l1")])
    res, dests = load(reader, keys)
    assert res.loaded == 4 and res.tiers == ("l1",) * 4
    assert_exact(keys, dests)
    reader.close()


def test_a_lower_tier_gets_no_orphan_when_an_ancestor_is_nowhere(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1", "l1")])
    lower = store.lower_tiers[0]
    keys = keys_for(4, salt=2)
    save(store, keys[:3]).wait()
    store.flush()
    assert lower.delete(keys[2]) and lower.delete(keys[1])
    assert store.memory.delete(keys[1])  # gone from DRAM too: keys[2] cannot be given a parent there
    with pytest.raises(TierWriteError, match="neither in l1 nor in DRAM"):
        save(store, keys[3:], keys[2], 3).wait()
    assert lower.lookup(keys) == 1 and not lower.contains(keys[2]) and not lower.contains(keys[3])
    assert store.metrics.get(m.WRITES_REFUSED, tier="l1") == 1
    assert store.memory.slot_counts()["pinned"] == 0
    store.close()


def test_a_lower_tier_asks_for_a_saved_chains_parent_once(tmp_path):
    store = make_store(tmp_path, [folder(tmp_path / "l1", "l1")])
    lower = store.lower_tiers[0]
    keys = keys_for(6, salt=3)
    save(store, keys[:2]).wait()
    asked = []
    real_contains = lower.contains
    lower.contains = lambda key: asked.append(key) or real_contains(key)
    save(store, keys[2:], keys[1], 2).wait()  # its parent is there: one question, no ancestor written
    assert asked == [keys[1]] and lower.lookup(keys) == 6
    store.close()
