"""Shared-folder tier: the disk tier on a folder that several hosts mount (NFS, CephFS, Lustre,
3FS's FUSE client), so a chunk one host computed is loaded by the others.

Who calls: the TieredStore or the host service of every host that mounts the folder, from their
I/O threads, exactly as they call the disk tier (the same batched Tier protocol, the same file
format and folder layout as kvtier.tiers.disk, so `kvtier store stats/clear` work on it too).

What differs from a local disk tier:
- Every host reads and writes. A write is the disk tier's: the whole file under a unique name in
  tmp/, then one rename into chunks/, so a reader on any host sees a whole chunk or none.
- A chunk another host wrote is found without a restart: a lookup or read that misses the index
  opens the chunk's path, verifies its header (layout, key) and adopts it, parent and depth
  included. A file of another layout is a miss and is left alone.
- Exactly one host is the *owner* (`owner=True`, enforced on one host by the disk tier's flock;
  across hosts it is configuration, see the README): it alone does capacity accounting, eviction
  and deletion. Every `rescan_s` seconds (and on `rescan()`) it indexes the files other hosts
  wrote, forgets files that vanished, removes temporary files older than `stale_temp_s` (a writer
  that crashed), and evicts down to capacity with its policy, tails of chains before heads. A file
  an I/O error keeps unread (and a chain below it) is left alone and never evicted, but its bytes
  count as used until a later rescan reads it (as the disk tier does at open).
- The other hosts never evict or delete, and account nothing: between two owner rescans they may
  push the folder over capacity by what they write meanwhile. Their hits still reach the owner's
  policy: `touch` (which the store calls for the hits it finds in this tier) sets the file's
  mtime to the server's clock (utime with no times: NFS's SET_TO_SERVER_TIME), at most once per
  `touch_interval_s` per chunk, tail of a chain first so its head ends freshest; the owner's rescan
  replays every mtime that moved as a touch, oldest first. Without this the owner would order
  chunks by its own hits only (with H hosts, 1/H of them) and evict chunks the others use. A file they find corrupt is a
  counted miss; they remember its (inode, size, mtime) so it is not re-read until it changes,
  and leave the deletion to the owner.
- A non-owner trusts an indexed chunk for `revalidate_s` seconds after it last saw the file, then
  stats it again on lookup; a chunk the owner deleted meanwhile (between a lookup and the load
  that follows it, say) is a plain miss: the open fails with ENOENT (or ESTALE on NFS), or the
  still-open file is read whole and verified. Never an error, never wrong bytes.

    SharedFolderTier(layout, chunk_tokens, SharedFolderTierConfig(root=..., owner=...))
    rescan() -> RescanReport        owner only; also run by a background thread every rescan_s
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvtier.core import metrics as m
from kvtier.core.codec import decode_header, header_size
from kvtier.core.config import DiskTierConfig, SharedFolderTierConfig
from kvtier.core.errors import CorruptChunkError, NewerFormatError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import Buffer, ChunkMeta, TierUsage, TierWriteError
from kvtier.tiers.disk import (
    CHUNKS_DIR,
    TMP_DIR,
    TMP_SUFFIX,
    DiskTier,
    FileSig,
    _Entry,
    _Held,
    _iter_chunk_files,
    _read_header_bytes,
    _scandir,
    _sig,
    _unlink_quietly,
)

log = logging.getLogger(__name__)

# DiskTier._evict_one_locked took a filter on victims, and then (issue 15) none; either way a
# trim may take any victim the disk tier allows
_ANY_VICTIM: tuple[Any, ...] = (
    (lambda key: True,) if len(inspect.signature(DiskTier._evict_one_locked).parameters) > 1 else ())

# errno values that mean "this file is gone": ENOENT locally, ESTALE when another NFS client
# removed a file this client still had a handle for.
_GONE = frozenset({errno.ENOENT, errno.ESTALE, errno.ENOTDIR})


@dataclass(slots=True, frozen=True)
class RescanReport:
    """What one owner rescan did."""

    adopted: int  # chunk files other hosts wrote, now indexed and accounted
    touched: int  # indexed chunks whose mtime another host moved (a hit there), touched in the policy
    vanished: int  # indexed chunks whose file was gone
    corrupt: int  # chunk files that failed validation (deleted)
    temp_files_removed: int  # stale temporary files of crashed writers
    evicted: int  # chunks evicted to get back under capacity
    used_bytes: int
    chunks: int
    orphans: int = 0  # chunk files whose chain reached no head at this rescan and the one before (deleted)
    unread: int = 0  # chunk files (or bucket folders) an I/O error kept from being read (left alone)


class SharedFolderTier(DiskTier):
    name = "shared_folder"

    def __init__(
        self,
        layout: KVLayout,
        chunk_tokens: int,
        config: SharedFolderTierConfig,
        metrics: m.Metrics | None = None,
        *,
        name: str = "shared_folder",
    ) -> None:
        self.name = name  # an instance attribute: its metrics and lookups carry the configured name
        self.shared_config = config
        self.owner = config.owner
        self._checked: dict[bytes, float] = {}  # non-owner: key -> when its file was last seen
        self._touched: dict[bytes, float] = {}  # non-owner: key -> when it last set the file's mtime
        self._mtimes: dict[bytes, int] = {}  # owner: key -> the file's mtime_ns when last indexed or touched
        self._orphaned: dict[bytes, FileSig] = {}  # owner: files the last rescan found orphaned (deleted if still so)
        self._bad: dict[bytes, tuple[int, int, int]] = {}  # key -> (inode, size, mtime) that failed
        self._stop = threading.Event()
        self._rescan_lock = threading.Lock()  # one rescan at a time (the background one, or a caller's)
        self._rescanner: threading.Thread | None = None
        self.last_rescan_error: OSError | None = None
        if not config.owner:
            _make_folders(config.root)  # the owner may not have started yet
        # A non-owner opens as the disk tier's reader (no lock, no index rebuild, no eviction)
        # and is then allowed to write.
        disk_config = DiskTierConfig(root=config.root, capacity_bytes=config.capacity_bytes, policy=config.policy,
                                     fsync=config.fsync, read_only=not config.owner)
        super().__init__(layout, chunk_tokens, disk_config, metrics)
        self.read_only = False
        if not config.owner:
            self.capacity_bytes = sys.maxsize  # a non-owner never refuses a write for room: the owner trims
        elif config.rescan_s > 0:
            self._rescanner = threading.Thread(target=self._rescan_loop, name="kvtier-shared-folder-rescan",
                                               daemon=True)
            self._rescanner.start()

    # -- lookup: the index, else the folder ---------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return self._present(key)

    def lookup(self, keys: Sequence[bytes]) -> int:
        n = 0
        for key in keys:
            if not self._present(key):
                break
            n += 1
        return n

    def _present(self, key: bytes) -> bool:
        entry = self._index.get(key)
        if entry is None:
            return self._adopt(key) is not None
        if self.owner:
            return True  # only the owner deletes, so its index is the truth for what it holds
        now = time.monotonic()
        if now - self._checked.get(key, 0.0) < self.shared_config.revalidate_s:
            return True
        try:
            os.stat(entry.path)
        except OSError as e:
            if e.errno not in _GONE:  # EIO, ETIMEDOUT (a soft mount whose server is away): a miss for now
                self._read_failed(key, e)
                return False
            self._forget(key, entry)
            return False
        self._checked[key] = now
        return True

    def _find(self, key: bytes) -> _Entry | None:
        entry = self._index.get(key)
        return entry if entry is not None else self._adopt(key)

    def _adopt(self, key: bytes) -> _Entry | None:
        """Index a chunk file another host committed, after verifying its header; None if absent or bad."""
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in _GONE:  # a shared mount's I/O error is a miss, never the engine's lookup failing
                self._read_failed(key, e)
            return None
        try:
            st = os.fstat(fd)
            sig = _sig(st)
            if self._bad.get(key) == sig:
                return None
            raw = _read_header_bytes(fd, header_size(self.layout.num_layers), st.st_size)
            header = decode_header(raw, st.st_size)
            if header.layout_id != self._layout_id:
                return None  # another configuration's chunk under a colliding name: not ours
            table = self._verify_header(header, key)
        except NewerFormatError:  # a newer kvtier's (a host upgraded first): a miss, not bad
            return None
        except CorruptChunkError:
            self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
            self._bad[key] = sig
            return None
        except OSError as e:
            if e.errno not in _GONE:
                self._read_failed(key, e)
            return None
        finally:
            os.close(fd)
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                entry = _Entry(path, st.st_size, header.parent, header.depth, (sig, table))
                self._unhold_locked(key)  # left unread at open or at a rescan: read now
                self._index[key] = entry
                self._used += st.st_size
                self._policy.insert(key, header.parent, header.depth)
                if self.owner:  # accounted now; trimmed back to capacity at its next write or rescan
                    self._mtimes[key] = st.st_mtime_ns
            self._checked[key] = time.monotonic()
        self._report_usage()
        return entry

    def touch(self, keys: Sequence[bytes]) -> None:
        """Hits on a chain's leading chunks: the owner's policy directly, a non-owner's through mtimes."""
        if self.owner:
            super().touch(keys)
            return
        now = time.monotonic()
        interval = self.shared_config.touch_interval_s
        for key in reversed(keys):  # the head's mtime ends latest: the owner evicts tails first
            entry = self._index.get(key)
            if entry is None or now - self._touched.get(key, -interval) < interval:
                continue
            try:
                os.utime(entry.path)
            except OSError:
                continue  # gone (a later lookup misses), not ours to touch, or the mount failing: only a hint
            self._touched[key] = now

    # -- reads: a file that vanished under us is a miss -----------------------------------------
    def read(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> ChunkMeta | None:
        try:
            return super().read(key, layers, dests)
        except OSError as e:
            self._read_failed(key, e)  # gone: forgotten; another I/O error: counted, kept for later
        self.metrics.inc(m.MISSES, tier=self.name)
        return None

    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None:
        try:
            return super().read_section(key, kind, index)
        except OSError as e:
            self._read_failed(key, e)
        return None

    def _read_failed(self, key: bytes, e: OSError) -> None:
        """The disk tier's hook for an I/O error in a read (issue 15): a file another host removed
        is a plain miss; other errors get the disk tier's treatment."""
        if e.errno in _GONE:
            self._forget_key(key)
            self.metrics.inc(m.MISSES, tier=self.name)
            return
        disk_hook = getattr(super(), "_read_failed", None)
        if disk_hook is not None:
            disk_hook(key, e)

    def _open_chunk(self, key: bytes, entry: _Entry | None) -> int:
        if entry is None:
            return -1
        try:
            return os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in _GONE:
                return super()._open_chunk(key, entry)  # the disk tier's answer to other errors
            self._forget(key, entry)
            return -1

    def _forget_key(self, key: bytes) -> None:
        entry = self._index.get(key)
        if entry is not None:
            self._forget(key, entry)

    def _forget(self, key: bytes, entry: _Entry) -> None:
        self._checked.pop(key, None)
        self._touched.pop(key, None)
        super()._forget(key, entry)

    def _drop_corrupt(self, key: bytes, entry: _Entry, fd: int = -1) -> None:
        """A chunk failed validation: a counted miss; the owner deletes the file, a non-owner
        remembers it (inode, size, mtime) so it is not read again until it is replaced."""
        self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
        sig = None
        try:
            st = os.fstat(fd) if fd >= 0 else os.stat(entry.path)
            sig = _sig(st)
        except OSError:
            pass
        with self._lock:
            self._checked.pop(key, None)
            self._touched.pop(key, None)
            # only if the index still holds the entry we read: a newer file is not ours to judge
            if self._unindex_locked(key, entry):
                if self.owner:
                    _unlink_if_unchanged(entry.path, sig)
                elif sig is not None:
                    self._bad[key] = sig
        self._report_usage()

    # -- writes: anyone; eviction and deletion: the owner only ------------------------------------
    def write(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bool:
        if not self.owner and meta.key in self._index:
            self._present(meta.key)  # revalidate: a chunk the owner evicted since is forgotten, so stored again
        if meta.depth > 0 and meta.parent in self._index and not self.owner:
            self._checked.pop(meta.parent, None)  # a stat now: a child whose parent the owner evicted is refused
            self._present(meta.parent)  # (its rescan drops what slips in between: an orphan)
        elif meta.depth > 0 and meta.parent not in self._index:
            self._find(meta.parent)  # a parent another host wrote: the disk tier checks its parent is indexed
        stored = super().write(meta, layers)
        if stored and self.owner and meta.key not in self._mtimes:
            try:  # the owner's own chunk: later mtime moves are other hosts' hits
                mtime = os.stat(self.path_of(meta.key)).st_mtime_ns
            except OSError as e:
                if e.errno not in _GONE:
                    raise
            else:
                with self._lock:
                    self._mtimes.setdefault(meta.key, mtime)
        return stored

    def _evict_one_locked(self, *args: Any) -> bool:
        if not self.owner:
            return False  # only the owner evicts
        return bool(super()._evict_one_locked(*args))

    def _trim_locked(self) -> int:
        """Owner: evict until the accounted bytes fit the capacity; returns the chunks evicted."""
        evicted = 0
        while self._used > self.capacity_bytes and self._evict_one_locked(*_ANY_VICTIM):
            evicted += 1
        return evicted

    def delete(self, key: bytes) -> bool:
        if not self.owner:
            raise TierWriteError(f"shared folder {self.root}: only the owner deletes chunks (this host is not it)")
        self._find(key)  # a chunk another host wrote since the last rescan is deleted too
        return super().delete(key)

    def usage(self) -> TierUsage:
        """The owner's accounting; a non-owner reports the chunks it has seen against the configured capacity."""
        with self._lock:
            return TierUsage(self._used, self.shared_config.capacity_bytes, len(self._index))

    # -- the owner's rescan ------------------------------------------------------------------------
    def rescan(self) -> RescanReport:
        """Owner: index what other hosts wrote, forget what vanished, drop stale temp files, trim."""
        if not self.owner:
            raise TierWriteError(f"shared folder {self.root}: only the owner rescans (this host is not it)")
        self._check_open()
        with self._rescan_lock:
            return self._rescan()

    def _rescan(self) -> RescanReport:
        with self._lock:
            before = dict(self._index)
            mtimes = dict(self._mtimes)
        on_disk: set[bytes] = set()
        found: dict[bytes, tuple[_Entry, int]] = {}
        corrupt = 0
        # files an I/O error kept from being read: neither adopted nor dropped, but held (their
        # bytes counted as used, as the disk tier counts those it leaves unread at open)
        unread: dict[bytes, _Held] = {}
        waiting: dict[bytes, _Entry] = {}  # chunks whose chain runs into an unread file: held too
        unread_buckets: set[str] = set()
        moved: list[tuple[int, bytes, bool]] = []  # (mtime, key, moved since we knew it) of indexed chunks
        for path, key, st in _iter_chunk_files(self._chunks_dir, unread_buckets):
            on_disk.add(key)
            if key in before:
                known = mtimes.get(key)
                if known is None or st.st_mtime_ns > known:
                    moved.append((st.st_mtime_ns, key, known is not None))
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:  # gone since it was listed: nothing to do; EACCES, EIO: one file, not the rescan
                if e.errno not in _GONE:
                    unread[key] = _Held(path, st.st_size, None)
                    self._read_failed(key, e)
                continue
            try:
                fst = os.fstat(fd)
                sig = _sig(fst)
                raw = _read_header_bytes(fd, header_size(self.layout.num_layers), fst.st_size)
                header = decode_header(raw, fst.st_size)
                if header.layout_id != self._layout_id:
                    continue
                table = self._verify_header(header, key)
            except NewerFormatError:  # a newer kvtier's, mid-upgrade: neither adopted nor deleted
                continue
            except CorruptChunkError:
                corrupt += 1
                self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
                _unlink_if_unchanged(path, sig)
                continue
            except OSError as e:
                if e.errno not in _GONE:
                    unread[key] = _Held(path, st.st_size, None)
                    self._read_failed(key, e)
                continue
            finally:
                os.close(fd)
            found[key] = (_Entry(path, fst.st_size, header.parent, header.depth, (sig, table)), fst.st_mtime_ns)
        for key in before:  # a bucket that could not be listed: its indexed chunks did not vanish
            if bytes(key).hex()[:2] in unread_buckets:
                on_disk.add(key)
        adopted = vanished = touched = 0
        orphans: list[_Entry] = []  # found orphaned by the last rescan too, unchanged: deleted
        seen_orphaned: dict[bytes, FileSig] = {}
        with self._lock:
            for key, entry in before.items():
                if key not in on_disk and self._unindex_locked(key, entry):
                    vanished += 1
            # the files held back before are judged again by this rescan (adopted, held again,
            # deleted or gone), except those in a bucket it could not list
            for key in [k for k in self._held if bytes(k).hex()[:2] not in unread_buckets]:
                self._unhold_locked(key)
            for mtime, key, was_touched in sorted(moved):  # oldest first: the latest hit ends freshest
                if key in self._index:
                    if was_touched:  # another host's hit (else the first sighting of the owner's own file)
                        self._policy.touch((key,))
                        touched += 1
                    self._mtimes[key] = mtime
            # oldest first, a parent before its children (as the disk tier's index rebuild does)
            # A chain is adopted only when it reaches a head (depth 0) or an indexed chunk: the
            # disk tier drops such orphans at open, and a lookup could never reach them. A file
            # orphaned at one rescan may only have been listed before its parent was published
            # (a scan is not atomic); orphaned, unchanged, at the next one too, it is deleted.
            for key in sorted(found, key=lambda k: (found[k][1], found[k][0].depth)):
                chain: list[bytes] = []
                k: bytes | None = key
                while k is not None and k in found and k not in self._index and k not in chain:
                    chain.append(k)
                    k = found[k][0].parent
                if not chain:
                    continue
                top = found[chain[-1]][0]
                if top.depth != 0 and top.parent not in self._index:
                    parent = top.parent
                    if parent is not None and (parent in unread or bytes(parent).hex()[:2] in unread_buckets):
                        waiting.update((c, found[c][0]) for c in chain)
                        continue  # may be fine at the next rescan
                    for c in chain:
                        entry = found.pop(c)[0]
                        assert entry.cache is not None  # set for every file this rescan read
                        if self._orphaned.get(c) == entry.cache[0]:
                            orphans.append(entry)
                        else:
                            seen_orphaned[c] = entry.cache[0]
                    continue
                for k in reversed(chain):
                    entry = found[k][0]
                    self._index[k] = entry
                    self._used += entry.file_bytes
                    self._policy.insert(k, entry.parent, entry.depth)
                    self._mtimes[k] = found[k][1]
                    adopted += 1
            for key, held in unread.items():
                if key not in self._index:  # (a write of this host may have replaced it meanwhile)
                    self._hold_locked(key, held)
            for key, entry in waiting.items():
                if key not in self._index:
                    self._hold_locked(key, _Held(entry.path, entry.file_bytes, entry))
            evicted = self._trim_locked()
            used, chunks = self._used, len(self._index)
            for key in [k for k in self._mtimes if k not in self._index]:
                del self._mtimes[key]
        self._orphaned = seen_orphaned
        for entry in orphans:
            self.metrics.inc(m.ORPHANS_DROPPED, tier=self.name)
            assert entry.cache is not None
            _unlink_if_unchanged(entry.path, entry.cache[0])
        temps = self._remove_stale_temp_files()
        self._report_usage()
        return RescanReport(adopted, touched, vanished, corrupt, temps, evicted, used, chunks, len(orphans),
                            len(unread) + len(unread_buckets))

    def _rescan_loop(self) -> None:
        while not self._stop.wait(self.shared_config.rescan_s):
            try:
                self.rescan()
                self.last_rescan_error = None
            except OSError as e:  # a shared mount can fail for a while; the next period retries
                self.last_rescan_error = e
                self.metrics.inc(m.WRITE_FAILURES, tier=self.name)
                log.warning("shared folder %s: rescan failed: %s", self.root, e)

    def _remove_temp_files(self) -> None:
        """Called by the disk tier's open (owner): only stale files, other hosts may be writing the rest."""
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> int:
        cutoff = time.time() - self.shared_config.stale_temp_s
        removed = 0
        for entry in _scandir(os.path.join(self.root, TMP_DIR)):
            if not entry.name.endswith(TMP_SUFFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_file(follow_symlinks=False) and st.st_mtime < cutoff:
                _unlink_quietly(entry.path)
                removed += 1
        return removed

    def _rebuild_index(self) -> None:
        """The owner indexes the whole folder at open; a non-owner starts empty and adopts on demand."""
        if self.owner:
            super()._rebuild_index()

    def close(self) -> None:
        self._stop.set()
        if self._rescanner is not None and self._rescanner is not threading.current_thread():
            self._rescanner.join()
        super().close()

    def __enter__(self) -> SharedFolderTier:
        return self


def _make_folders(root: str) -> None:
    try:
        for sub in (CHUNKS_DIR, TMP_DIR):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    except OSError as e:
        raise TierUnavailableError(f"shared_folder.root {root}: cannot create {sub}/: {e.strerror}") from None


def _unlink_if_unchanged(path: str, sig: FileSig | None) -> None:
    """Remove the corrupt file that was read (inode, size, mtime `sig`), not a good copy another
    host has renamed over the same path since (it would be lost to every host)."""
    if sig is not None:
        try:
            st = os.stat(path)
        except OSError:
            return  # gone already, or unreadable: the next read judges it again
        if _sig(st) != sig:
            return
    _unlink_quietly(path)


__all__ = ["RescanReport", "SharedFolderTier", "SharedFolderTierConfig"]

