"""Regression: chunk files an I/O error kept unread at a disk tier's open (or at a shared folder
owner's rescan) were not counted in used bytes until the next open, so the folder could grow past
its capacity while they sat on disk. They are now held: counted, never evicted (they may be
valid), replaced by a write of their key, removed by `delete`, and read again later.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kvtier.core import metrics as m
from kvtier.core.codec import ALIGN
from kvtier.core.config import DiskTierConfig, SharedFolderTierConfig
from kvtier.tiers.base import TierUsage
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.shared_folder import SharedFolderTier
from tests.conftest import CHUNK, TINY, key_of
from tests.tiers.test_disk import chain, put

FILE = 3 * ALIGN  # one chunk file of TINY: header + two sections, each padded to 4 KiB


def open_disk(root, capacity: int = 1 << 20) -> DiskTier:
    return DiskTier(TINY, CHUNK, DiskTierConfig(root=str(root), capacity_bytes=capacity))


def open_owner(root, capacity: int = 1 << 20) -> SharedFolderTier:
    return SharedFolderTier(TINY, CHUNK, SharedFolderTierConfig(root=str(root), owner=True, rescan_s=0,
                                                                capacity_bytes=capacity))


def chunk_files(root) -> set[bytes]:
    return {bytes.fromhex(p.stem) for p in Path(root, "chunks").glob("*/*.kvc")}


def fail_opening(monkeypatch, path: str, err: int = errno.EIO) -> None:
    real = os.open

    def failing_open(p, *args, **kwargs):
        if str(p) == path:
            raise OSError(err, os.strerror(err), p)
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES], ids=["EIO", "EACCES"])
def test_files_left_unread_at_open_count_as_used_bytes_and_keep_the_folder_under_capacity(tmp_path, monkeypatch,
                                                                                          err):
    t = open_disk(tmp_path)
    a = chain(t, [1, 2])  # a[0] will be unreadable; a[1] waits on it
    (b0,) = chain(t, [3])
    t.close()
    fail_opening(monkeypatch, t.path_of(a[0]), err)
    t = open_disk(tmp_path, capacity=5 * FILE)
    monkeypatch.undo()
    assert t.keys() == [b0] and t.metrics.get(m.READ_ERRORS, tier="disk") == 1
    assert t.usage().used_bytes == 3 * FILE  # was FILE: the two files it skipped were not counted
    for i in (4, 5, 6, 7):
        assert put(t, key_of(i))
    # five files' room: the two it could not read stay (they may be valid), the rest is evicted
    assert t.usage().used_bytes == 5 * FILE
    assert len(chunk_files(tmp_path)) == 5 and set(a) <= chunk_files(tmp_path)
    t.close()


def test_a_write_of_a_key_left_unread_replaces_its_file_and_brings_back_its_chain(tmp_path, monkeypatch):
    t = open_disk(tmp_path)
    a = chain(t, [1, 2, 3])
    t.close()
    fail_opening(monkeypatch, t.path_of(a[0]))
    t = open_disk(tmp_path)
    monkeypatch.undo()
    assert t.lookup(a) == 0 and t.usage().used_bytes == 3 * FILE
    assert put(t, a[0])  # the store saves the chunk again: the new file replaces the unread one
    assert t.lookup(a) == 3  # its children were read at open: indexed again, no second write needed
    assert t.usage() == TierUsage(3 * FILE, t.capacity_bytes, 3)  # counted once each
    t.close()
    assert open_disk(tmp_path).usage().used_bytes == 3 * FILE


def test_delete_removes_a_file_left_unread(tmp_path, monkeypatch):
    t = open_disk(tmp_path)
    (a,) = chain(t, [1])
    t.close()
    fail_opening(monkeypatch, t.path_of(a))
    t = open_disk(tmp_path)
    monkeypatch.undo()
    assert t.usage().used_bytes == FILE
    assert t.delete(a) and not os.path.exists(t.path_of(a))
    assert t.usage().used_bytes == 0 and not t.delete(a)
    t.close()


def test_a_shared_folder_owner_counts_unread_files_until_a_rescan_reads_them(tmp_path, monkeypatch):
    owner = open_owner(tmp_path)
    a = chain(owner, [1, 2])
    (b0,) = chain(owner, [3])
    owner.close()
    bad = owner.path_of(a[0])
    fail_opening(monkeypatch, bad)
    owner = open_owner(tmp_path)  # left unread at open ...
    assert owner.usage().used_bytes == 3 * FILE and owner.keys() == [b0]
    report = owner.rescan()  # ... and at a rescan while the error lasts: still counted, once
    assert report.unread == 1 and report.used_bytes == 3 * FILE and owner.usage().chunks == 1
    monkeypatch.undo()
    report = owner.rescan()  # the error has passed: adopted, and counted once
    assert report.adopted == 2 and report.used_bytes == 3 * FILE and owner.lookup(a) == 2
    owner.close()


def test_a_shared_folder_owner_counts_a_file_another_host_wrote_that_it_cannot_read(tmp_path, monkeypatch):
    owner = open_owner(tmp_path, capacity=4 * FILE)
    member = SharedFolderTier(TINY, CHUNK, SharedFolderTierConfig(root=str(tmp_path), owner=False))
    theirs = chain(member, [1, 2])
    fail_opening(monkeypatch, owner.path_of(theirs[0]), errno.EACCES)  # a file another host made 0600
    report = owner.rescan()
    assert report.unread == 1 and report.adopted == 0 and report.used_bytes == 2 * FILE
    for i in (10, 11, 12):
        assert put(owner, key_of(i))
    assert owner.usage().used_bytes == 4 * FILE and len(chunk_files(tmp_path)) == 4  # five before
    assert set(theirs) <= chunk_files(tmp_path)  # left alone, never evicted
    monkeypatch.undo()
    assert owner.lookup(theirs) == 2  # a lookup reads them now: adopted, each counted once
    assert owner.usage().used_bytes == 4 * FILE and owner.rescan().used_bytes == 4 * FILE
    member.close()
    owner.close()
