"""Disk tier: one file per chunk under a root folder (local SSD, or a shared mount).

Who calls: the TieredStore (in-process mode) or the host service, from its I/O threads;
the CLI calls `scan_root` (`kvtier store stats`) and `clear_root` (`kvtier store clear`).

Folder layout (every path is built only from the hex digest of a key):

    <root>/.owner.lock                      flock held by the owning process (its pid inside)
    <root>/chunks/<hh>/<hex of key>.kvc     one chunk: core.codec header + 4 KiB-aligned sections
    <root>/tmp/<hex>.<pid>.<random>.tmp     a chunk being written

A chunk file holds one SECTION_KV section per layer (index = layer, in layer order) and
then the chunk's optional extra sections, exactly as core/codec.py lays them out.

Writes are crash-safe: the whole file is written under a unique temporary name, optionally
fsynced, and renamed into place, so a chunk is published complete or not at all; only then
does the index see it. A key already stored is not rewritten. Every read verifies the header
and the xxh3 checksum of each section it copied into the caller's buffer; a chunk that
fails is a miss: counted, dropped from the index and (owner only) deleted, never returned.
`read` returns the chunk's extra sections in its meta only when it reads every layer (a
whole-chunk read, as a promotion does); a layer-wise read returns `extras=()`, and
`read_section` fetches one extra section on its own.

Chains stay whole on disk. A chunk below a chain's head is written only while its parent is
indexed (else the write is refused), and eviction takes only leaves (chunks with no stored
child), never the parent of a write in flight: no write can cut a chain, its own or another's,
and no crash can leave a child whose parent is gone. When nothing may go, the write is refused
(False, counted as writes refused). A full filesystem (ENOSPC) below `capacity_bytes` evicts
one more chunk and retries once, then raises TierRefusedError.

The index is rebuilt at open by reading every chunk header. A file that fails validation is
counted and, by the owner, deleted; an I/O error reading a header (EIO, EMFILE) proves nothing
about the file: it is skipped and counted as a read error, and kept. A chunk whose chain does
not reach a head through the files found (its parent was corrupt) is dropped (counted; the
owner deletes it); one whose chain runs into a file left unread is kept back with it. The
owner counts the files it keeps back (*held*) as used bytes, since they fill the disk all the
same, and never evicts them (they may be valid); a write of a held key replaces its file (and
indexes again the held chunks below it that were read), `delete` removes it, and the next open
reads it again. The eviction policy learns the chunks oldest file first, parents before
their children, so the order survives restarts. Files whose header names another KV layout
belong to another configuration: they are left alone and not indexed, but their bytes count
against capacity (a warning names the folder). During a read, an I/O error makes that chunk a
miss (counted, file kept), never a failed load.

Several processes sharing one folder:
- One *owner* (read_only=False) per folder, enforced by a non-blocking flock on
  .owner.lock; a second owner is refused with TierUnavailableError. Only the owner writes,
  evicts, deletes and accounts capacity; at open it removes temporary files left by a crash.
- Any number of *readers* (read_only=True) take no lock and never write or delete. A reader
  indexes the folder at open and stats the key's path on every lookup, so it finds chunks
  committed later and forgets files the owner removed. Readers only ever see whole, committed
  chunks (rename is atomic) and verify what they read; a chunk the owner evicted meanwhile is
  a plain miss, and a file that failed verification stays a miss until the owner replaces it.
  A reader's usage() counts only the chunks it has seen.
- On a shared mount (NFS, CephFS) flock and rename atomicity are what that filesystem
  provides; use one owner per folder across all hosts.

Thread-safety: one lock guards the index, the policy and the byte accounting; file I/O runs
outside it, except unlinks, which run under it so that a delete can never race a rewrite of
the same key. A file being read may be evicted concurrently (the open descriptor keeps the
inode alive); a file being written is a temporary file the index does not know, so eviction
cannot touch it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvtier.core import metrics as m
from kvtier.core.codec import (
    ALIGN,
    MAX_KEY_BYTES,
    SECTION_KV,
    ChunkHeader,
    Section,
    align_up,
    checksum,
    decode_header,
    encode_header,
    header_size,
)
from kvtier.core.config import DiskTierConfig
from kvtier.core.errors import CorruptChunkError, NewerFormatError, StoreClosedError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import (
    Buffer,
    ChunkMeta,
    Tier,
    TierRefusedError,
    TierUsage,
    TierWriteError,
    check_chunk,
    check_dests,
    check_key,
    chunk_sections,
)
from kvtier.tiers.policies import make_policy
from kvtier.tiers.throttle import ReadThrottle

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CHUNKS_DIR = "chunks"
TMP_DIR = "tmp"
LOCK_FILE = ".owner.lock"
CHUNK_SUFFIX = ".kvc"
TMP_SUFFIX = ".tmp"

_CHUNK_NAME = re.compile(r"^(?:[0-9a-f]{2}){1,32}\.kvc$")
_TMP_NAME = re.compile(r"^[0-9a-f]{2,64}\.\d+\.[0-9a-f]+\.tmp$")
_BUCKET_NAME = re.compile(r"^[0-9a-f]{2}$")
_IOV_MAX = 1024  # Linux's limit on buffers per readv/writev call
_ZEROS = bytes(ALIGN)  # padding between sections


@dataclass(slots=True, frozen=True)
class _Table:
    """A verified header for this tier's layout: KV sections by layer, then the extras."""

    header: ChunkHeader
    kv: tuple[Section, ...]
    extras: tuple[Section, ...]
    checksums: tuple[int, ...]  # of the KV sections, by layer (ChunkMeta's; built once per header)


FileSig = tuple[int, int, int]  # (inode, size, mtime_ns): files are replaced by rename, so a new file differs


def _sig(st: os.stat_result) -> FileSig:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class _Entry:
    path: str
    file_bytes: int
    parent: bytes | None
    depth: int
    # ((inode, size, mtime_ns) of the file, its verified header table): a read of the same file
    # skips re-reading and re-parsing the header (files are replaced by rename, so a new file is a
    # new inode); it still checksums every section it reads against the table.
    cache: tuple[FileSig, _Table] | None = None


@dataclass(slots=True)
class _Held:
    """A chunk file the owner found at open (or a shared folder's rescan) and did not index, as
    an I/O error kept its header, or an ancestor's, unread: left alone and never evicted, but its
    bytes count as used."""

    path: str
    file_bytes: int
    entry: _Entry | None  # its verified entry when its own header was read (an ancestor's was not)


class _PublishError(Exception):
    """A step of publishing a chunk file failed (internal: DiskTier.write turns it into TierWriteError)."""

    def __init__(self, step: str, cause: OSError) -> None:
        super().__init__(step, cause)
        self.step = step
        self.cause = cause


def chunk_path(root: str | os.PathLike[str], key: bytes) -> str:
    """<root>/chunks/<hh>/<hex>.kvc for a key of 1..32 bytes."""
    if not isinstance(key, (bytes, bytearray)) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a chunk key must be 1..{MAX_KEY_BYTES} bytes")
    hx = bytes(key).hex()
    return os.path.join(root, CHUNKS_DIR, hx[:2], hx + CHUNK_SUFFIX)


class DiskTier(Tier):
    name = "disk"

    def __init__(
        self,
        layout: KVLayout,
        chunk_tokens: int,
        config: DiskTierConfig,
        metrics: m.Metrics | None = None,
    ) -> None:
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.config = config
        self.metrics = metrics or m.Metrics()
        self.read_only = config.read_only
        self.capacity_bytes = config.capacity_bytes
        self._layout_id = layout.layout_id(chunk_tokens)
        self._policy = make_policy(config.policy)
        self._index: dict[bytes, _Entry] = {}
        self._writing: set[bytes] = set()
        # parents of the writes in flight (with counts): eviction takes only leaves, so sparing
        # these spares every ancestor of a chunk being written; its chain cannot be cut under it
        self._write_parents: dict[bytes, int] = {}
        self._bad: dict[bytes, FileSig] = {}  # reader: files found corrupt (a miss until replaced)
        self._held: dict[bytes, _Held] = {}  # owner: files on disk not indexed (unread), counted in _used
        self._used = 0
        self._reserved = 0  # bytes of writes in flight
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd = -1
        self._buckets: set[str] = set()
        self.foreign_chunks = 0  # files of another layout found at open (left alone, counted in used bytes)
        self.foreign_bytes = 0
        self.read_hook: Callable[[int, float], object] | None = None  # (bytes, started): a read throttle
        if config.read_throttle_gbps > 0:
            self.read_hook = ReadThrottle(config.read_throttle_gbps * 1e9)

        self.root = _open_root(config)
        self._chunks_dir = os.path.join(self.root, CHUNKS_DIR)
        self._tmp_dir = os.path.join(self.root, TMP_DIR)
        if not self.read_only:
            self._lock_fd = _take_owner_lock(self.root)
            try:
                for d in (self._chunks_dir, self._tmp_dir):
                    os.makedirs(d, exist_ok=True)
                self._remove_temp_files()
            except OSError as e:
                self._release_owner_lock()
                raise TierUnavailableError(f"disk.root {self.root} is not writable: {e.strerror}") from None
        try:
            self._rebuild_index()
        except OSError as e:  # the chunks folder itself cannot be listed (EACCES, EIO)
            self._release_owner_lock()
            raise TierUnavailableError(f"disk.root {self.root}: cannot read its chunk files: {e}") from None

    # -- paths -------------------------------------------------------------------------
    def path_of(self, key: bytes) -> str:
        return chunk_path(self.root, key)

    # -- lookup ------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        if self.read_only:
            return self._discover(key) is not None
        return key in self._index

    def lookup(self, keys: Sequence[bytes]) -> int:
        n = 0
        if self.read_only:  # the owner may have evicted or added files since: ask the folder
            for key in keys:
                if self._discover(key) is None:
                    break
                n += 1
            return n
        index = self._index
        for key in keys:
            if key not in index:
                break
            n += 1
        return n

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            self._policy.touch(keys)

    # -- read --------------------------------------------------------------------------
    def read(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> ChunkMeta | None:
        check_key(key)
        views = check_dests(self, layers, dests)
        self._check_open()
        t0 = time.perf_counter()
        entry = self._find(key)
        fd = self._open_chunk(key, entry)
        if entry is None or fd < 0:
            self.metrics.inc(m.MISSES, tier=self.name)
            return None
        try:
            table = self._load_table(fd, key, entry)
            sections = [table.kv[layer] for layer in layers]
            _preadv_sections(fd, sections, views)
            for layer, section, view in zip(layers, sections, views, strict=True):
                if checksum(view) != section.checksum:
                    raise CorruptChunkError(f"layer {layer} checksum mismatch")
            extras: tuple[tuple[int, int, bytes], ...] = ()
            if table.extras and len(set(layers)) == self.layout.num_layers:
                extras = tuple((s.kind, s.index, _read_verified(fd, s)) for s in table.extras)
        except CorruptChunkError:
            self._drop_corrupt(key, entry, fd)
            return None
        except OSError as e:
            self._read_failed(key, e)
            return None
        finally:
            os.close(fd)
        if self.read_hook is not None:
            self.read_hook(len(layers) * self.layer_bytes, t0)
        h = table.header
        self.metrics.inc(m.HITS, tier=self.name)
        self.metrics.inc(m.BYTES_READ, len(layers) * self.layer_bytes, tier=self.name)
        self.metrics.inc(m.READ_SECONDS, time.perf_counter() - t0, tier=self.name)
        return ChunkMeta(h.key, h.parent, h.depth, h.num_tokens, table.checksums, extras)

    def read_gbps(self) -> float | None:
        """Measured read bandwidth; under a read throttle, at most the cap, and the cap itself
        before the first read (the load planner knows a throttled disk from the first request)."""
        measured = super().read_gbps()
        cap = self.read_hook.bytes_per_s / 1e9 if isinstance(self.read_hook, ReadThrottle) else None
        if cap is None:
            return measured
        return cap if measured is None else min(measured, cap)

    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None:
        check_key(key)
        self._check_open()

        def section_of(fd: int, table: _Table) -> bytes | None:
            section = table.header.section(kind, index)
            return None if section is None else _read_verified(fd, section)

        data = self._with_table(key, self._find(key), section_of)
        if data is None:
            return None
        self.metrics.inc(m.BYTES_READ, len(data), tier=self.name)
        return data

    def meta(self, key: bytes) -> ChunkMeta | None:
        """A stored chunk's meta from its verified header, without its extras (no section is
        read; `read` of every layer returns them); None for a miss. The store walks a chain's
        parents with it to find the ancestors a lower tier lacks."""
        check_key(key)
        self._check_open()
        entry = self._find(key)
        if entry is not None and entry.cache is not None:
            table: _Table | None = entry.cache[1]  # verified when this file was read or written
        else:
            table = self._with_table(key, entry, lambda fd, loaded: loaded)
        if table is None:
            return None
        h = table.header
        return ChunkMeta(h.key, h.parent, h.depth, h.num_tokens, table.checksums)

    def _with_table(self, key: bytes, entry: _Entry | None, use: Callable[[int, _Table], _T | None]) -> _T | None:
        """Open `key`'s file, load its verified section table and return use(fd, table); None for a
        miss, and for a corrupt chunk (dropped) or an I/O error (counted, the file kept)."""
        fd = self._open_chunk(key, entry)
        if entry is None or fd < 0:
            return None
        try:
            return use(fd, self._load_table(fd, key, entry))
        except CorruptChunkError:
            self._drop_corrupt(key, entry, fd)
            return None
        except OSError as e:
            self._read_failed(key, e)
            return None
        finally:
            os.close(fd)

    def _find(self, key: bytes) -> _Entry | None:
        entry = self._index.get(key)
        if entry is None and self.read_only:
            entry = self._discover(key)
        return entry

    def _discover(self, key: bytes) -> _Entry | None:
        """Reader mode: the entry of a chunk file that exists now, indexing one the owner committed
        after we opened and forgetting one it removed; a file found corrupt stays a miss until
        the owner replaces it (a new inode)."""
        entry = self._index.get(key)
        path = entry.path if entry is not None else self.path_of(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            if entry is not None:
                self._forget(key, entry)
            return None
        except OSError as e:
            self._read_failed(key, e)
            return None
        if self._bad and key in self._bad:
            if self._bad[key] == _sig(st):
                return None
            self._bad.pop(key, None)  # replaced by the owner: worth a read again
        if entry is not None:
            return entry
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                entry = self._index[key] = _Entry(path, st.st_size, None, 0)
                self._used += st.st_size
                self._policy.insert(key, None, 0)
        return entry

    def _open_chunk(self, key: bytes, entry: _Entry | None) -> int:
        """An open descriptor, or -1 when the file is gone (evicted by the owner meanwhile) or
        cannot be opened now (EMFILE, EIO: a miss, counted; the file is kept)."""
        if entry is None:
            return -1
        try:
            return os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(key, entry)
            return -1
        except OSError as e:
            self._read_failed(key, e)
            return -1

    def _read_failed(self, key: bytes, e: OSError) -> None:
        """An I/O error (not a bad checksum) reading a chunk: a miss now, the file stays for later."""
        self.metrics.inc(m.READ_ERRORS, tier=self.name)
        log.warning("kvtier: disk tier: reading chunk %s under %s failed: %s", key.hex()[:16], self.root, e)

    def _load_table(self, fd: int, key: bytes, entry: _Entry) -> _Table:
        """The verified header of an open chunk file (read and parsed again only for another file)."""
        st = os.fstat(fd)
        sig = _sig(st)
        cache = entry.cache
        if cache is not None and cache[0] == sig:
            return cache[1]
        raw = _read_header_bytes(fd, header_size(self.layout.num_layers), st.st_size)
        table = self._verify_header(decode_header(raw, st.st_size), key)
        entry.cache = (sig, table)
        return table

    def _verify_header(self, header: ChunkHeader, key: bytes) -> _Table:
        if header.layout_id != self._layout_id:
            raise CorruptChunkError("chunk was written for another KV layout or chunk size")
        if header.key != key:
            raise CorruptChunkError("key in the header does not match the file name")
        num_layers = self.layout.num_layers
        kv: list[Section | None] = [None] * num_layers
        extras = []
        for s in header.sections:
            if s.kind != SECTION_KV:
                extras.append(s)
            elif not 0 <= s.index < num_layers or kv[s.index] is not None or s.length != self.layer_bytes:
                raise CorruptChunkError(f"bad KV section for layer {s.index} ({s.length} bytes)")
            else:
                kv[s.index] = s
        if any(s is None for s in kv):
            raise CorruptChunkError("chunk lacks a KV section for some layer")
        return _Table(header, tuple(kv), tuple(extras), tuple(s.checksum for s in kv))  # type: ignore[arg-type, union-attr]

    def _forget(self, key: bytes, entry: _Entry) -> None:
        with self._lock:
            self._unindex_locked(key, entry)
        self._deliver_changes()
        self._report_usage()

    def _drop_corrupt(self, key: bytes, entry: _Entry, fd: int) -> None:
        """A chunk failed validation: count it, unindex it and (owner only) delete its file.

        A reader cannot delete it: it remembers the file (`fd`'s inode, size, mtime) so that
        later lookups miss it until the owner replaces or removes it."""
        self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
        if self.read_only:
            try:
                self._bad[key] = _sig(os.fstat(fd))
            except OSError:
                pass
        with self._lock:
            # Only if the index still holds the entry we read: otherwise the key was evicted
            # and perhaps rewritten meanwhile, and that newer file is not ours to delete.
            if self._unindex_locked(key, entry) and not self.read_only:
                _unlink_quietly(entry.path)
        self._deliver_changes()
        self._report_usage()

    def _unindex_locked(self, key: bytes, entry: _Entry) -> bool:
        if self._index.get(key) is not entry:
            return False
        del self._index[key]
        self._policy.remove(key)
        self._used -= entry.file_bytes
        self._record_removed(key)
        return True

    # -- write -------------------------------------------------------------------------
    def write(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bool:
        """Store a whole chunk; True if stored (or already there), False if refused.

        Refused (counted as WRITES_REFUSED): a chunk below a chain's head whose parent is not
        on disk (after a restart it could never be reached), or no room without evicting an
        ancestor of a chunk being written (only leaves are evicted, and never the parent of a
        write in flight, so no write cuts a chain). A full filesystem (ENOSPC) below
        `capacity_bytes` evicts one more chunk and retries once, then raises TierRefusedError.
        A key another thread is writing right now also returns True at once.
        """
        if self.read_only:
            raise TierWriteError(f"disk tier at {self.root} was opened read_only; it cannot write")
        self._check_open()
        check_chunk(meta.key, meta.parent, meta.depth, "meta.key")
        sections, payloads = chunk_sections(meta, layers, self.layout.num_layers, self.layer_bytes)
        raw, header = encode_header(self._layout_id, meta.key, meta.parent, meta.depth, meta.num_tokens, sections)
        table = self._verify_header(header, meta.key)
        total = header.file_bytes
        key = meta.key
        final = self.path_of(key)  # validates the key
        parent = meta.parent if meta.depth > 0 else None

        with self._lock:
            if key in self._index or key in self._writing:
                return True
            if parent is not None and parent not in self._index:
                self.metrics.inc(m.WRITES_REFUSED, tier=self.name)
                return False
            if not self._policy.admit(key, meta.parent, meta.depth):
                return False
            if parent is not None:  # spared by every eviction until this write ends
                self._write_parents[parent] = self._write_parents.get(parent, 0) + 1
            try:
                if not self._make_room_locked(total):
                    self.metrics.inc(m.WRITES_REFUSED, tier=self.name)
                    self._release_parent_locked(parent)
                    return False
            except OSError as e:
                self._release_parent_locked(parent)
                raise self._write_failed(key, "evicting to make room", e) from e
            self._reserved += total
            self._writing.add(key)

        t0 = time.perf_counter()
        bufs: list[Any] = [raw]
        for section, data in zip(header.sections, payloads, strict=True):
            bufs.append(data)
            pad = align_up(section.offset + section.length) - section.offset - section.length
            if pad:
                bufs.append(memoryview(_ZEROS)[:pad])
        try:
            try:
                sig = self._publish(key, bufs, final)
            except _PublishError as e:
                if e.cause.errno != errno.ENOSPC:
                    raise
                # the filesystem is full below capacity_bytes (other files share it): make room
                # by one more eviction and try once more; else refuse the chunk
                with self._lock:
                    freed = self._evict_one_locked()
                if not freed:
                    raise
                sig = self._publish(key, bufs, final)
            with self._lock:
                self._index[key] = _Entry(final, total, meta.parent, meta.depth, (sig, table))
                self._used += total
                self._policy.insert(key, meta.parent, meta.depth)
                self._record_stored(meta)
                if self._held:  # a file left unread at open was replaced by this one
                    self._unhold_locked(key)
                    self._index_held_children_locked(key)
        except _PublishError as e:
            if e.cause.errno == errno.ENOSPC:
                self.metrics.inc(m.WRITE_FAILURES, tier=self.name)
                raise TierRefusedError(
                    f"disk tier: no space left (ENOSPC) on the filesystem of {self.root} for chunk {key.hex()[:16]} "
                    f"({self._used} of capacity_bytes {self.capacity_bytes} used; evicting did not free enough)"
                ) from e.cause
            raise self._write_failed(key, e.step, e.cause) from e.cause
        except OSError as e:  # evicting for the retry failed
            raise self._write_failed(key, "evicting to make room", e) from e
        finally:
            with self._lock:
                self._reserved -= total
                self._writing.discard(key)
                self._release_parent_locked(parent)
            self._deliver_changes()
        self.metrics.inc(m.BYTES_WRITTEN, sum(s.length for s in header.sections), tier=self.name)
        self.metrics.inc(m.WRITE_SECONDS, time.perf_counter() - t0, tier=self.name)
        self._report_usage()
        return True

    def _publish(self, key: bytes, bufs: list[Any], final: str) -> FileSig:
        """Write `bufs` to a temporary file and rename it to `final`; the published file's
        signature. On failure nothing is left behind and _PublishError names the step."""
        tmp = os.path.join(self._tmp_dir, f"{key.hex()}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        fd = -1
        renamed = False
        step = "creating a temporary file for"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the tmp folder went (as above): made again, once
                os.makedirs(self._tmp_dir, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            step = "writing"
            _writev_all(fd, bufs)
            if self.config.fsync:
                step = "fsyncing"
                os.fsync(fd)
            sig = _sig(os.fstat(fd))  # rename keeps inode, size and mtime
            os.close(fd)
            fd = -1
            step = "publishing"
            bucket = os.path.dirname(final)
            self._ensure_bucket(bucket)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                # the bucket folder went since it was made (`kvtier store clear` on a shared
                # folder other hosts still write into): made again, once
                self._buckets.discard(bucket)
                self._ensure_bucket(bucket)
                os.rename(tmp, final)
            renamed = True
            if self.config.fsync:
                _fsync_dir(bucket)
            return sig
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)
            if renamed:
                _unlink_quietly(final)
            raise _PublishError(step, e) from e

    def _make_room_locked(self, total: int) -> bool:
        """Evict leaves until `total` more bytes fit; False if they cannot (what went stays gone)."""
        if self._reserved + total > self.capacity_bytes:
            return False
        while self._used + self._reserved + total > self.capacity_bytes:
            if not self._evict_one_locked():
                return False
        return True

    def _release_parent_locked(self, parent: bytes | None) -> None:
        if parent is None:
            return
        left = self._write_parents.get(parent, 0) - 1
        if left > 0:
            self._write_parents[parent] = left
        else:
            self._write_parents.pop(parent, None)

    def _write_failed(self, key: bytes, step: str, e: OSError) -> TierWriteError:
        self.metrics.inc(m.WRITE_FAILURES, tier=self.name)
        cause = errno.errorcode.get(e.errno or 0, "error")
        return TierWriteError(
            f"disk tier: {step} chunk {key.hex()[:16]} under {self.root} failed: {e.strerror or e} ({cause})"
        )

    def _ensure_bucket(self, bucket: str) -> None:
        if bucket in self._buckets:
            return
        if not os.path.isdir(bucket):
            os.makedirs(bucket, exist_ok=True)
            if self.config.fsync:
                _fsync_dir(self._chunks_dir)
        self._buckets.add(bucket)

    def _evict_one_locked(self) -> bool:
        """Evict one leaf (a chunk with no stored child) that is not the parent of a write in
        flight; False if none may go. Never a chain's inner chunk: that would strand its tail."""
        index = self._index
        policy = self._policy
        spared = self._write_parents
        victim = policy.evict(lambda k: k in index and k not in spared and policy.is_leaf(k))
        if victim is None:
            return False
        entry = index.pop(victim)
        self._used -= entry.file_bytes
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass
        except OSError:
            index[victim] = entry  # still on disk: keep accounting for it
            self._used += entry.file_bytes
            self._policy.insert(victim, entry.parent, entry.depth)
            raise
        self._record_removed(victim)
        self.metrics.inc(m.EVICTIONS, tier=self.name)
        return True

    # -- delete / usage / close ----------------------------------------------------------
    def delete(self, key: bytes) -> bool:
        if self.read_only:
            raise TierWriteError(f"disk tier at {self.root} was opened read_only; it cannot delete")
        self._check_open()
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is None:
                return self._delete_held_locked(key)
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._index[key] = entry
                raise self._write_failed(key, "deleting", e) from e
            self._policy.remove(key)
            self._used -= entry.file_bytes
            self._record_removed(key)
        self._deliver_changes()
        self._report_usage()
        return True

    def _delete_held_locked(self, key: bytes) -> bool:
        """Remove the file of a held chunk (not indexed: an I/O error kept it unread at open)."""
        held = self._held.get(key)
        if held is None:
            return False
        try:
            os.unlink(held.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._write_failed(key, "deleting", e) from e
        self._unhold_locked(key)
        return True

    # -- held files (not indexed: an I/O error kept them unread) ------------------------
    def _hold_locked(self, key: bytes, held: _Held) -> None:
        """Count a chunk file that is not indexed as used bytes (it fills the disk all the same)."""
        self._unhold_locked(key)
        self._held[key] = held
        self._used += held.file_bytes

    def _unhold_locked(self, key: bytes) -> _Held | None:
        held = self._held.pop(key, None)
        if held is not None:
            self._used -= held.file_bytes
        return held

    def _index_held_children_locked(self, parent: bytes) -> None:
        """Index the held chunks below `parent`, now indexed, whose own headers were read: only
        their chain's unread file kept them back. Their bytes were counted already."""
        parents = [parent]
        while parents and self._held:
            p = parents.pop()
            for key, held in list(self._held.items()):
                entry = held.entry
                if entry is None or entry.depth == 0 or entry.parent != p or key in self._index:
                    continue
                self._unhold_locked(key)
                self._index[key] = entry
                self._used += entry.file_bytes
                self._policy.insert(key, entry.parent, entry.depth)
                parents.append(key)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.capacity_bytes, len(self._index))

    def _report_usage(self) -> None:
        self.metrics.set(m.USED_BYTES, self._used, tier=self.name)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("disk tier is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release_owner_lock()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release_owner_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    # -- open ----------------------------------------------------------------------------
    def _remove_temp_files(self) -> None:
        """Owner only, under the owner lock: no other process can be writing these."""
        for entry in _scandir(self._tmp_dir):
            if entry.name.endswith(TMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                _unlink_quietly(entry.path)

    def _drop_orphans(self, found: dict[bytes, tuple[_Entry, int]], unread: set[bytes],
                      unread_buckets: Collection[str] = ()) -> None:
        """Remove from `found` every chunk whose chain does not reach a head (depth 0) through
        chunks in `found`: no lookup could reach it (its parent was corrupt, or lost in a crash).
        The owner deletes its file (counted); a chain that runs into a file an I/O error kept
        unread, or into a missing parent whose bucket folder could not be listed, is only
        skipped (not indexed, not deleted; the owner holds it, its bytes counted as used): it
        may be fine at the next open."""
        status: dict[bytes, str] = {}
        for key in found:
            trail: list[bytes] = []
            on_trail: set[bytes] = set()
            k = key
            while True:
                if k in status:
                    verdict = status[k]
                    break
                if k in unread or (k not in found and bytes(k).hex()[:2] in unread_buckets):
                    verdict = "unread"
                    break
                if k not in found or k in on_trail:  # missing parent, or a cycle (not kvtier's)
                    verdict = "orphan"
                    break
                trail.append(k)
                on_trail.add(k)
                entry = found[k][0]
                if entry.depth == 0:
                    verdict = "ok"
                    break
                k = entry.parent  # type: ignore[assignment]  # set for every chunk read at open
            for t in trail:
                status[t] = verdict
        for key, verdict in status.items():
            if verdict == "ok":
                continue
            entry = found.pop(key)[0]
            if verdict == "orphan":
                self.metrics.inc(m.ORPHANS_DROPPED, tier=self.name)
                if not self.read_only:
                    _unlink_quietly(entry.path)
            elif not self.read_only:
                self._hold_locked(key, _Held(entry.path, entry.file_bytes, entry))

    def _rebuild_index(self) -> None:
        found: dict[bytes, tuple[_Entry, int]] = {}
        unread: set[bytes] = set()  # headers an I/O error kept us from reading: left alone
        unread_buckets: set[str] = set()  # bucket folders an I/O error kept us from listing: left alone
        for path, key, st in _iter_chunk_files(self._chunks_dir, unread_buckets):
            try:
                header = _read_header_file(path, st.st_size)
                if header.layout_id != self._layout_id:
                    self.foreign_chunks += 1
                    self.foreign_bytes += st.st_size
                    continue
                table = self._verify_header(header, key)
            except FileNotFoundError:
                continue
            except NewerFormatError:  # a newer kvtier's (a shared folder mid-upgrade): left alone, counted
                self.foreign_chunks += 1
                self.foreign_bytes += st.st_size
                continue
            except CorruptChunkError:
                self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
                if not self.read_only:
                    _unlink_quietly(path)
                continue
            except OSError as e:  # EIO, EMFILE, ...: not proof the file is bad; keep it, skip it
                unread.add(key)
                self._read_failed(key, e)
                if not self.read_only:  # the owner accounts it: it takes room all the same
                    self._hold_locked(key, _Held(path, st.st_size, None))
                continue
            entry = _Entry(path, st.st_size, header.parent, header.depth, (_sig(st), table))
            found[key] = (entry, st.st_mtime_ns)
        if self.foreign_chunks:
            # they take space on the same disk: count them against capacity (never evicted here)
            self._used += self.foreign_bytes
            log.warning(
                "kvtier: disk.root %s holds %d chunk files (%d bytes) written for another KV layout or chunk "
                "size; they are not served, and count against capacity_bytes", self.root,
                self.foreign_chunks, self.foreign_bytes)
        self._drop_orphans(found, unread, unread_buckets)

        # Oldest file first, but a parent always before its children, so the policy links
        # every child to its parent (and never evicts a head before its tail).
        inserted: set[bytes] = set()
        for key in sorted(found, key=lambda k: (found[k][1], found[k][0].depth)):
            chain: list[bytes] = []
            seen: set[bytes] = set()
            k: bytes | None = key
            while k is not None and k in found and k not in inserted and k not in seen:
                chain.append(k)
                seen.add(k)
                k = found[k][0].parent
            for k in reversed(chain):
                entry = found[k][0]
                self._index[k] = entry
                self._used += entry.file_bytes
                self._policy.insert(k, entry.parent, entry.depth)
                inserted.add(k)
        if not self.read_only:
            with self._lock:
                try:
                    while self._used > self.capacity_bytes and self._evict_one_locked():
                        pass
                except OSError as e:
                    self._release_owner_lock()
                    raise TierUnavailableError(f"disk.root {self.root}: cannot evict down to capacity: {e}") from None
        self._report_usage()


# -- folder helpers ---------------------------------------------------------------------------
def _open_root(config: DiskTierConfig) -> str:
    if not config.root:
        raise TierUnavailableError("disk.root is empty; set it to a folder for the disk tier")
    root = os.path.abspath(config.root)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise TierUnavailableError(f"disk.root {root} exists but is not a folder")
    if not os.path.isdir(root):
        if config.read_only:
            raise TierUnavailableError(
                f"disk.root {root} does not exist; a read_only tier cannot create it (start the owner first)"
            )
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise TierUnavailableError(f"cannot create disk.root {root}: {e.strerror}") from None
    need = os.R_OK | os.X_OK if config.read_only else os.R_OK | os.W_OK | os.X_OK
    if not os.access(root, need):
        what = "readable" if config.read_only else "readable and writable"
        hint = "" if config.read_only else "; open a folder you may only read with read_only=True"
        raise TierUnavailableError(f"disk.root {root} is not {what} by this process{hint}")
    return root


def _take_owner_lock(root: str) -> int:
    path = os.path.join(root, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise TierUnavailableError(
            f"cannot create the owner lock {path}: {e.strerror}; open a folder you may only read with read_only=True"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise TierUnavailableError(
                f"disk.root {root} is owned by another process (pid {holder}); only one owner may write a "
                "folder: open it with read_only=True to share it as a reader"
            ) from None
        raise TierUnavailableError(f"cannot lock {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only a hint for the error message above
    return fd


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _iter_chunk_files(chunks_dir: str, unread_buckets: set[str] | None = None,
                      ) -> Iterator[tuple[str, bytes, os.stat_result]]:
    """(path, key, stat) of every file named like a chunk: chunks/<hh>/<hex>.kvc.

    With `unread_buckets`, a bucket folder that cannot be listed, or holds a file that cannot be
    stat'ed (EACCES, EIO), is skipped and its name added there (logged): the caller leaves what
    may be in it alone. Without, that error is raised. chunks_dir itself unreadable: raised."""
    for bucket in _scandir(chunks_dir):
        if not _BUCKET_NAME.match(bucket.name) or not bucket.is_dir(follow_symlinks=False):
            continue
        try:
            files = _scandir(bucket.path)
            stats = []
            for f in files:
                if not _CHUNK_NAME.match(f.name) or not f.name.startswith(bucket.name):
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if f.is_file(follow_symlinks=False):
                    stats.append((f.path, bytes.fromhex(f.name[: -len(CHUNK_SUFFIX)]), st))
        except OSError as e:
            if unread_buckets is None:
                raise
            unread_buckets.add(bucket.name)
            log.warning("kvtier: cannot read the chunk files in %s (%s); they are left alone", bucket.path, e)
            continue
        yield from stats


def _read_header_bytes(fd: int, guess: int, file_bytes: int) -> bytes:
    raw = os.pread(fd, guess, 0)
    if len(raw) >= 16:
        declared = int.from_bytes(raw[12:16], "little")
        if len(raw) < declared <= file_bytes:
            raw += os.pread(fd, declared - len(raw), len(raw))
        elif declared <= len(raw):
            raw = raw[:declared]
    return raw


def _read_header_file(path: str, file_bytes: int) -> ChunkHeader:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = _read_header_bytes(fd, ALIGN, file_bytes)
    finally:
        os.close(fd)
    return decode_header(raw, file_bytes)


def _read_verified(fd: int, section: Section) -> bytes:
    data = os.pread(fd, section.length, section.offset)
    if len(data) != section.length:
        raise CorruptChunkError(f"short read of section ({section.kind}, {section.index})")
    if checksum(data) != section.checksum:
        raise CorruptChunkError(f"section ({section.kind}, {section.index}) checksum mismatch")
    return data


def _preadv_sections(fd: int, sections: Sequence[Section], views: Sequence[memoryview]) -> None:
    """Read sections into views; runs of sections adjacent in the file share one preadv."""
    scratch: memoryview | None = None
    i = 0
    while i < len(sections):
        start = sections[i].offset
        bufs = [views[i]]
        end = start + sections[i].length
        i += 1
        while i < len(sections) and sections[i].offset == align_up(end):
            pad = sections[i].offset - end
            if pad:
                scratch = scratch if scratch is not None else memoryview(bytearray(ALIGN))
                bufs.append(scratch[:pad])
            bufs.append(views[i])
            end = sections[i].offset + sections[i].length
            i += 1
        _preadv_all(fd, bufs, start)


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first n bytes were transferred."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _preadv_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    while bufs:
        n = os.preadv(fd, bufs[:_IOV_MAX], offset)
        if n <= 0:
            raise CorruptChunkError("short read: file is truncated")
        offset += n
        bufs = _advance(bufs, n)


def _writev_all(fd: int, bufs: list[Any]) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        views = _advance(views, n)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    """Remove a file that may already be gone; any other failure is left for the next open."""
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or e.g. EROFS: the next owner open (temp files) or read (chunks) retries


# -- CLI helpers --------------------------------------------------------------------------------
def scan_root(root: str | os.PathLike[str]) -> dict[str, int | str]:
    """Statistics of a disk-tier folder, read-only: chunks, bytes, corrupt files, temp files."""
    path = os.path.abspath(root)
    if not os.path.isdir(path):
        raise TierUnavailableError(f"{path} is not a folder")
    chunks = total = corrupt = 0
    for file, key, st in _iter_chunk_files(os.path.join(path, CHUNKS_DIR)):
        try:
            header = _read_header_file(file, st.st_size)
        except FileNotFoundError:
            continue
        except (CorruptChunkError, OSError):
            corrupt += 1
            continue
        if header.key != key:
            corrupt += 1
            continue
        chunks += 1
        total += st.st_size
    temps = [e for e in _scandir(os.path.join(path, TMP_DIR)) if _TMP_NAME.match(e.name)]
    return {"root": path, "chunks": chunks, "bytes": total, "corrupt": corrupt, "temp_files": len(temps)}


def clear_root(root: str | os.PathLike[str]) -> dict[str, int]:
    """Remove every chunk and temp file kvtier created under `root`, then the empty folders.

    Only chunks/<hh>/<hex>.kvc and tmp/<...>.tmp files are removed; anything else stays.
    Refuses a folder that does not look like a kvtier root (no chunks/ folder and no
    .owner.lock) and a folder an owner process holds open.
    """
    path = os.path.abspath(root)
    chunks_dir = os.path.join(path, CHUNKS_DIR)
    lock_path = os.path.join(path, LOCK_FILE)
    if not os.path.isdir(path):
        raise TierUnavailableError(f"{path} is not a folder")
    if not (os.path.isdir(chunks_dir) or os.path.isfile(lock_path)):
        raise TierUnavailableError(f"{path} does not look like a kvtier disk folder (no {CHUNKS_DIR}/ or {LOCK_FILE})")
    try:
        lock_fd = _take_owner_lock(path)  # refuses a folder in use; keeps an owner out meanwhile
    except TierUnavailableError as e:
        raise TierUnavailableError(f"cannot clear {path}: {e}") from None
    removed = removed_bytes = temps = 0
    try:
        for file, _key, st in _iter_chunk_files(chunks_dir):
            try:
                os.unlink(file)
            except FileNotFoundError:
                continue
            removed += 1
            removed_bytes += st.st_size
        for tmp in _scandir(os.path.join(path, TMP_DIR)):
            if _TMP_NAME.match(tmp.name) and tmp.is_file(follow_symlinks=False):
                _unlink_quietly(tmp.path)
                temps += 1
        for bucket in _scandir(chunks_dir):
            if _BUCKET_NAME.match(bucket.name):
                _rmdir_if_empty(bucket.path)
        _rmdir_if_empty(chunks_dir)
        _rmdir_if_empty(os.path.join(path, TMP_DIR))
    finally:
        os.close(lock_fd)
    return {"chunks": removed, "bytes": removed_bytes, "temp_files": temps}


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (holds files kvtier did not create) or already gone


__all__ = ["DiskTier", "chunk_path", "clear_root", "scan_root"]
