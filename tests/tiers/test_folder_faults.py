"""The disk tier and the shared folder under file-system faults an audit found mishandled:

- one chunk file the owner cannot open or read (EACCES, EIO) aborted every shared-folder rescan,
  so nothing other hosts wrote was adopted or trimmed again and the folder grew past capacity;
- a member wrote a child under a parent the owner had evicted (its index still named the parent),
  and the owner's rescan adopted the orphan: counted against capacity, never reachable;
- after `kvtier store clear` removed the folders, a live member's writes failed for good;
- an unreadable bucket folder at a disk tier's open was a raw PermissionError that kept the
  folder's owner lock, and the children of its chunks would have been deleted as orphans;
- a store whose DRAM tier failed to open kept its disk tier's owner lock.
"""

from __future__ import annotations

import errno
import hashlib
import os

import numpy as np
import pytest

from kvtier.core import metrics as m
from kvtier.core.codec import ALIGN, checksum
from kvtier.core.config import DiskTierConfig, MemoryTierConfig, SharedFolderTierConfig, StoreConfig
from kvtier.core.errors import ConfigError, TierUnavailableError
from kvtier.store.tiered import TieredStore
from kvtier.tiers.base import ChunkMeta
from kvtier.tiers.disk import DiskTier, chunk_path, clear_root
from kvtier.tiers.shared_folder import SharedFolderTier
from tests.conftest import CHUNK, TINY

FILE = 3 * ALIGN  # one chunk file of TINY: header + two sections, each padded to 4 KiB
HEAD = b"\0" * 32  # the parent of a depth-0 chunk


def key_of(i: int) -> bytes:
    return hashlib.sha256(b"folder-faults" + i.to_bytes(4, "little")).digest()


def put(tier, key: bytes, parent: bytes = HEAD, depth: int = 0) -> bool:
    lb = TINY.layer_bytes(CHUNK)
    layers = [np.frombuffer(hashlib.shake_256(key + bytes([i])).digest(lb), np.uint8).copy()
              for i in range(TINY.num_layers)]
    return tier.write(ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers)), layers)


def chain(tier, ids: list[int]) -> list[bytes]:
    keys = [key_of(i) for i in ids]
    for depth, key in enumerate(keys):
        assert put(tier, key, keys[depth - 1] if depth else HEAD, depth)
    return keys


def shared(root, owner: bool, **kw) -> SharedFolderTier:
    return SharedFolderTier(TINY, CHUNK, SharedFolderTierConfig(root=str(root), owner=owner, rescan_s=0, **kw))


@pytest.mark.parametrize("fault", ["open", "read"])
def test_one_unreadable_file_does_not_stop_the_owners_rescan(tmp_path, monkeypatch, fault):
    owner = shared(tmp_path, True, capacity_bytes=4 * FILE)
    member = shared(tmp_path, False)
    keys = [chain(member, [i])[0] for i in range(10)]  # another host's ten chains: over capacity
    bad = chunk_path(tmp_path, keys[3])
    bad_inode = os.stat(bad).st_ino
    real_open, real_pread = os.open, os.pread

    def failing_open(path, *a, **kw):
        if str(path) == bad:  # a file another host made 0600
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **kw)

    def failing_pread(fd, n, off):
        if os.fstat(fd).st_ino == bad_inode:  # a bad sector, a soft NFS mount
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, off)

    if fault == "open":
        monkeypatch.setattr(os, "open", failing_open)
    else:
        monkeypatch.setattr(os, "pread", failing_pread)
    report = owner.rescan()  # raised before
    monkeypatch.undo()
    assert report.unread == 1 and report.adopted == 9 and owner.usage().used_bytes <= 4 * FILE
    assert os.path.exists(bad)  # an I/O error is no proof the file is bad: left alone
    assert owner.metrics.get(m.READ_ERRORS, tier=owner.name) == 1
    owner.close()
    member.close()


def test_an_orphan_is_never_adopted_and_is_deleted_at_its_second_rescan(tmp_path):
    owner = shared(tmp_path, True, capacity_bytes=2 * FILE)
    member = shared(tmp_path, False)
    head, child = key_of(1), key_of(2)
    assert put(member, head)
    assert owner.rescan().adopted == 1
    assert put(owner, key_of(10)) and put(owner, key_of(11))  # the owner evicts head (its oldest leaf)
    assert not os.path.exists(chunk_path(tmp_path, head))
    # the member's index still names head; its write now checks the folder and refuses the child
    assert not put(member, child, head, 1)
    assert not os.path.exists(chunk_path(tmp_path, child))
    # an orphan that slips in all the same (the eviction lands between that check and the publish)
    orphan = key_of(3)
    os.makedirs(os.path.dirname(chunk_path(tmp_path, orphan)), exist_ok=True)
    writer = DiskTier(TINY, CHUNK, DiskTierConfig(root=str(tmp_path / "elsewhere"), capacity_bytes=1 << 20))
    assert put(writer, head) and put(writer, orphan, head, 1)
    writer.close()
    os.replace(chunk_path(tmp_path / "elsewhere", orphan), chunk_path(tmp_path, orphan))
    first = owner.rescan()
    assert first.adopted == 0 and orphan not in owner.keys()  # adopted and counted before
    assert os.path.exists(chunk_path(tmp_path, orphan))  # maybe only listed before its parent: kept once
    second = owner.rescan()
    assert second.orphans == 1 and not os.path.exists(chunk_path(tmp_path, orphan))
    assert owner.metrics.get(m.ORPHANS_DROPPED, tier=owner.name) == 1
    owner.close()
    member.close()


def test_a_chain_whose_parent_arrives_by_the_next_rescan_is_adopted_whole(tmp_path):
    owner = shared(tmp_path, True)
    elsewhere = DiskTier(TINY, CHUNK, DiskTierConfig(root=str(tmp_path / "elsewhere"), capacity_bytes=1 << 20))
    head, child = chain(elsewhere, [1, 2])
    elsewhere.close()
    for key in (child, head):  # the rescan lists the child before its parent is published
        os.makedirs(os.path.dirname(chunk_path(tmp_path, key)), exist_ok=True)
        os.replace(chunk_path(tmp_path / "elsewhere", key), chunk_path(tmp_path, key))
        report = owner.rescan()
        assert report.orphans == 0
    assert report.adopted == 2 and set(owner.keys()) == {head, child}
    owner.close()


def test_a_member_writes_again_after_the_folder_was_cleared(tmp_path):
    member = shared(tmp_path, False)
    key = chain(member, [1])[0]
    clear_root(str(tmp_path))  # `kvtier store clear`: it takes the owner lock, which members never hold
    assert not os.path.exists(os.path.dirname(chunk_path(tmp_path, key)))
    for _ in range(2):
        assert put(member, key)  # failed with ENOENT at every try before: its bucket was cached as made
    assert os.path.exists(chunk_path(tmp_path, key))
    assert put(member, key_of(5)) and os.path.exists(chunk_path(tmp_path, key_of(5)))
    member.close()


def test_an_unreadable_bucket_at_open_is_left_alone_and_the_lock_released(tmp_path, monkeypatch):
    root = str(tmp_path / "disk")
    tier = DiskTier(TINY, CHUNK, DiskTierConfig(root=root, capacity_bytes=1 << 20))
    keys = chain(tier, list(range(6)))
    tier.close()
    blocked = os.path.basename(os.path.dirname(chunk_path(root, keys[2])))
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(str(path)) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    tier = DiskTier(TINY, CHUNK, DiskTierConfig(root=root, capacity_bytes=1 << 20))
    assert tier.lookup(keys) == 2  # the chain stops at the chunk it could not list
    tier.close()
    monkeypatch.undo()
    tier = DiskTier(TINY, CHUNK, DiskTierConfig(root=root, capacity_bytes=1 << 20))
    assert tier.lookup(keys) == 6  # its children were not deleted as orphans meanwhile
    tier.close()
    # the chunks folder itself unreadable: a TierUnavailableError, and the lock is let go
    blocked = "chunks"
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(TierUnavailableError, match="cannot read its chunk files"):
        DiskTier(TINY, CHUNK, DiskTierConfig(root=root, capacity_bytes=1 << 20))
    monkeypatch.undo()
    DiskTier(TINY, CHUNK, DiskTierConfig(root=root, capacity_bytes=1 << 20)).close()  # refused as "owned" before


def test_a_store_whose_dram_tier_fails_lets_its_disk_folder_go(tmp_path):
    cfg = StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=4 * TINY.chunk_bytes(CHUNK)),
                      disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 30))
    with pytest.raises(ConfigError, match="memory pool"):
        TieredStore(cfg, TINY, memory_pool=np.zeros(7, np.uint8))
    TieredStore(cfg, TINY).close()  # refused before: "owned by another process" (this one)


def _bump_format(path: str) -> None:
    """Make a chunk file one written by a newer kvtier (its format version, bytes 8-9, one higher)."""
    from kvtier.core.codec import FORMAT_VERSION

    with open(path, "r+b") as f:
        f.seek(8)
        f.write((FORMAT_VERSION + 1).to_bytes(2, "little"))


def test_chunks_of_a_newer_format_are_left_alone_not_deleted_as_corrupt(tmp_path):
    """A shared folder in a rolling upgrade: the hosts still on this version found the upgraded
    hosts' chunks "corrupt" and deleted them (the owner at its rescans and at its open)."""
    owner = shared(tmp_path, True)
    member = shared(tmp_path, False)
    newer, ours = key_of(1), key_of(2)
    assert put(member, newer) and put(member, ours)
    _bump_format(chunk_path(tmp_path, newer))
    report = owner.rescan()
    assert report.adopted == 1 and report.corrupt == 0 and newer not in owner.keys()
    assert os.path.exists(chunk_path(tmp_path, newer))  # deleted before
    reader = shared(tmp_path, False)
    assert reader.lookup([newer]) == 0 and newer not in reader._bad  # a miss, not marked bad
    owner.close()
    reopened = shared(tmp_path, True)  # the disk tier's index rebuild at the owner's open
    assert os.path.exists(chunk_path(tmp_path, newer)) and reopened.foreign_chunks == 1
    assert reopened.metrics.get(m.CHECKSUM_FAILURES, tier=reopened.name) == 0
    for tier in (reopened, member, reader):
        tier.close()
