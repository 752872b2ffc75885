import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvtier.core import metrics as m
from kvtier.core.codec import ALIGN, SECTION_KV, SECTION_SUMMARY, checksum, decode_header
from kvtier.core.config import DiskTierConfig
from kvtier.core.errors import StoreClosedError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import ChunkMeta, TierRefusedError, TierWriteError
from kvtier.tiers.disk import DiskTier, chunk_path, clear_root, scan_root
from kvtier.tiers.policies import POLICIES
from tests.conftest import CHUNK, TINY, key_of, payload
from tests.tiers import disk_writer

ROOT_KEY = b"\0" * 32
LB = TINY.layer_bytes(CHUNK)
FILE = 3 * ALIGN  # header + two 512-byte sections, each padded to 4 KiB
WRITER = str(Path(disk_writer.__file__).resolve())


def open_tier(root, capacity=1 << 20, layout=TINY, **kw) -> DiskTier:
    return DiskTier(layout, CHUNK, DiskTierConfig(root=str(root), capacity_bytes=capacity, **kw))


def put(t: DiskTier, key: bytes, parent: bytes = ROOT_KEY, depth: int = 0, extras=()) -> bool:
    layers = payload(key, t.layout)
    meta = ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers), tuple(extras))
    return t.write(meta, layers)


def chain(t: DiskTier, ids: list[int]) -> list[bytes]:
    keys = [key_of(i) for i in ids]
    parent = ROOT_KEY
    for d, k in enumerate(keys):
        assert put(t, k, parent, d)
        parent = k
    return keys


def read(t: DiskTier, key: bytes, layers=(0, 1)):
    dests = [np.zeros(t.layer_bytes, np.uint8) for _ in layers]
    meta = t.read(key, list(layers), dests)
    return meta, dests


def assert_exact(t: DiskTier, key: bytes, layers=(0, 1)) -> ChunkMeta:
    meta, dests = read(t, key, layers)
    assert meta is not None
    want = payload(key, t.layout)
    for layer, got in zip(layers, dests, strict=True):
        assert np.array_equal(got, want[layer])
    return meta


def files_on_disk(root) -> dict[bytes, int]:
    out = {}
    for p in Path(root, "chunks").glob("*/*.kvc"):
        out[bytes.fromhex(p.stem)] = p.stat().st_size
    return out


def fail(t: DiskTier, name: str) -> float:
    return t.metrics.get(name, tier="disk")


# -- basic read / write -----------------------------------------------------------------------
def test_roundtrip_whole_and_one_layer(tmp_path):
    t = open_tier(tmp_path)
    (k,) = chain(t, [1])
    path = Path(tmp_path, "chunks", k.hex()[:2], k.hex() + ".kvc")
    assert str(path) == t.path_of(k) == chunk_path(tmp_path, k)
    assert path.stat().st_size == FILE
    header = decode_header(path.read_bytes(), FILE)
    assert header.layout_id == TINY.layout_id(CHUNK) and header.key == k and header.parent == ROOT_KEY
    assert [(s.kind, s.index, s.length) for s in header.sections] == [(SECTION_KV, 0, LB), (SECTION_KV, 1, LB)]
    assert [s.checksum for s in header.sections] == [checksum(x) for x in payload(k)]

    meta = assert_exact(t, k)
    assert (meta.key, meta.parent, meta.depth, meta.num_tokens) == (k, ROOT_KEY, 0, CHUNK)
    assert meta.checksums == tuple(checksum(x) for x in payload(k))
    assert_exact(t, k, layers=(1,))
    assert fail(t, m.HITS) == 2
    assert fail(t, m.BYTES_READ) == 3 * LB
    assert fail(t, m.BYTES_WRITTEN) == 2 * LB
    assert t.usage().used_bytes == FILE and t.usage().chunks == 1
    assert t.keys() == [k]
    assert read(t, key_of(99))[0] is None
    assert fail(t, m.MISSES) == 1


def test_fsync_mode_roundtrip(tmp_path):
    t = open_tier(tmp_path, fsync=True)
    keys = chain(t, [1, 2])
    t.close()
    t = open_tier(tmp_path, fsync=True)
    for k in keys:
        assert_exact(t, k)


def test_path_is_built_only_from_the_key_digest(tmp_path):
    t = open_tier(tmp_path)
    key = b"../../etc/passwd".ljust(32, b"/")
    assert put(t, key)
    assert Path(t.path_of(key)).parent.parent == Path(tmp_path, "chunks")
    assert files_on_disk(tmp_path) == {key: FILE}
    with pytest.raises(ValueError):
        t.path_of(b"")


def test_layers_in_any_order_and_adjacent_layers_share_one_preadv(tmp_path, monkeypatch):
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_size=8)
    t = open_tier(tmp_path, layout=layout)
    k = key_of(1)
    assert put(t, k)
    calls = []
    real = os.preadv

    def counting_preadv(fd, bufs, offset):
        calls.append(offset)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    for layers, ncalls in [((0, 1, 2), 1), ((1, 2), 1), ((0, 2), 2), ((2, 0), 2), ((2,), 1)]:
        calls.clear()
        assert_exact(t, k, layers)
        assert len(calls) == ncalls, layers


def test_existing_key_is_not_rewritten(tmp_path):
    t = open_tier(tmp_path)
    k = key_of(1)
    assert put(t, k)
    other = [np.full(LB, 7, np.uint8)] * 2
    assert t.write(ChunkMeta(k, ROOT_KEY, 0, CHUNK, (checksum(other[0]),) * 2), other)
    assert fail(t, m.BYTES_WRITTEN) == 2 * LB
    assert_exact(t, k)


def test_bad_arguments_raise(tmp_path):
    t = open_tier(tmp_path)
    k = key_of(1)
    layers = payload(k)
    with pytest.raises(ValueError):
        t.write(ChunkMeta(k, ROOT_KEY, 0, CHUNK, (1,)), layers[:1])
    with pytest.raises(ValueError):
        t.write(ChunkMeta(k, ROOT_KEY, 0, CHUNK, (1, 2)), [layers[0], layers[1][:-1]])
    with pytest.raises(ValueError):
        t.write(ChunkMeta(k, ROOT_KEY, 0, CHUNK, (1, 2), ((SECTION_KV, 5, b"x"),)), layers)
    assert put(t, k)
    with pytest.raises(ValueError):
        t.read(k, [0], [np.zeros(LB - 1, np.uint8)])
    with pytest.raises(ValueError):
        t.read(k, [2], [np.zeros(LB, np.uint8)])
    assert t.usage().chunks == 1


def test_extra_sections(tmp_path):
    t = open_tier(tmp_path)
    k = key_of(1)
    summary = bytes(range(200))
    assert put(t, k, extras=[(SECTION_SUMMARY, 0, summary), (SECTION_SUMMARY, 1, b"s1")])
    assert t.read_section(k, SECTION_SUMMARY, 0) == summary
    assert t.read_section(k, SECTION_SUMMARY, 1) == b"s1"
    assert t.read_section(k, SECTION_SUMMARY, 2) is None
    assert t.read_section(key_of(2), SECTION_SUMMARY, 0) is None
    assert assert_exact(t, k).extras == ((SECTION_SUMMARY, 0, summary), (SECTION_SUMMARY, 1, b"s1"))
    assert assert_exact(t, k, layers=(0,)).extras == ()
    assert Path(t.path_of(k)).stat().st_size == 5 * ALIGN


def test_delete_touch_and_close(tmp_path):
    t = open_tier(tmp_path)
    a, b = chain(t, [1, 2])
    assert t.delete(b) and not t.delete(b)
    assert not Path(t.path_of(b)).exists()
    assert t.usage() == (t.usage().__class__)(FILE, 1 << 20, 1)
    assert t.lookup([a, b]) == 1
    t.touch([a])
    t.close()
    t.close()
    with pytest.raises(StoreClosedError):
        put(t, key_of(3))
    with pytest.raises(StoreClosedError):
        read(t, a)


# -- capacity and eviction ---------------------------------------------------------------------
def test_capacity_never_exceeded_and_exact_lru_order(tmp_path):
    t = open_tier(tmp_path, capacity=3 * FILE)
    a0, a1 = chain(t, [1, 2])
    (b0,) = chain(t, [3])
    evicted = []
    for i in (4, 5, 6, 7):
        if i == 6:
            t.touch([b0])  # b0 becomes the freshest
        before = set(t.keys())
        assert put(t, key_of(i))
        (gone,) = before - set(t.keys())
        evicted.append(gone)
        assert t.usage().used_bytes <= 3 * FILE
        assert files_on_disk(tmp_path) == dict.fromkeys(t.keys(), FILE)
        assert t.usage().used_bytes == sum(files_on_disk(tmp_path).values())
    # a1 (the tail) goes before a0 although a0 is older; then a0, then key 4, then key 5
    assert evicted == [a1, a0, key_of(4), key_of(5)]
    assert set(t.keys()) == {b0, key_of(6), key_of(7)}
    assert fail(t, m.EVICTIONS) == 4


def test_eviction_spares_the_new_chunks_parent(tmp_path):
    t = open_tier(tmp_path, capacity=2 * FILE)
    (a0,) = chain(t, [1])
    (b0,) = chain(t, [2])
    assert put(t, key_of(3), parent=a0, depth=1)  # a0 is the oldest leaf, but it is the parent
    assert set(t.keys()) == {a0, key_of(3)}


def test_no_room_returns_false(tmp_path):
    assert not put(open_tier(tmp_path / "a", capacity=FILE - 1), key_of(1))
    t = open_tier(tmp_path / "b", capacity=FILE)
    (a0,) = chain(t, [1])
    assert not put(t, key_of(2), parent=a0, depth=1)  # only the parent could make room
    assert t.keys() == [a0]
    assert not list(Path(tmp_path, "b", "tmp").iterdir())


def test_reopen_serves_what_was_committed(tmp_path):
    t = open_tier(tmp_path)
    keys = chain(t, [1, 2, 3]) + chain(t, [4])
    t.close()
    t = open_tier(tmp_path)
    assert sorted(t.keys()) == sorted(keys)
    assert t.usage().used_bytes == 4 * FILE
    for k in keys:
        assert_exact(t, k)
    assert t.lookup(keys[:3]) == 3


def test_reopen_rebuilds_lru_order_from_file_mtimes(tmp_path):
    t = open_tier(tmp_path)
    x, y, z = (key_of(i) for i in (1, 2, 3))
    for k in (x, y, z):
        put(t, k)
    t.close()
    for k, age in ((y, 300), (z, 200), (x, 100)):
        os.utime(t.path_of(k), ns=(time.time_ns() - age * 10**9,) * 2)
    t = open_tier(tmp_path, capacity=3 * FILE)
    put(t, key_of(4))
    assert set(t.keys()) == {x, z, key_of(4)}
    put(t, key_of(5))
    assert set(t.keys()) == {x, key_of(4), key_of(5)}


def test_reopen_links_children_whose_file_is_older_than_their_parent(tmp_path):
    t = open_tier(tmp_path)
    a0, a1 = chain(t, [1, 2])
    t.close()
    os.utime(t.path_of(a1), ns=(time.time_ns() - 10**10,) * 2)  # e.g. a0 was evicted and rewritten
    t = open_tier(tmp_path, capacity=2 * FILE)
    t.touch([a1])
    put(t, key_of(3))
    assert set(t.keys()) == {a0, key_of(3)}  # the tail went, the head stayed


def test_reopen_with_a_smaller_capacity_evicts_down_to_it(tmp_path):
    t = open_tier(tmp_path)
    chain(t, [1, 2, 3])
    t.close()
    t = open_tier(tmp_path, capacity=2 * FILE)
    assert t.usage().used_bytes == 2 * FILE
    assert sorted(t.keys()) == sorted([key_of(1), key_of(2)])
    assert len(files_on_disk(tmp_path)) == 2


# -- corruption --------------------------------------------------------------------------------
def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize(
    "damage",
    ["header_magic", "header_key", "section0", "section1_last_byte", "truncate_mid", "truncate_one_byte"],
)
def test_corrupt_chunk_is_a_miss_deleted_and_counted(tmp_path, damage):
    t = open_tier(tmp_path)
    k, other = key_of(1), key_of(2)
    put(t, k)
    put(t, other)
    path = t.path_of(k)
    if damage == "header_magic":
        _flip(path, 0)
    elif damage == "header_key":
        _flip(path, 50)
    elif damage == "section0":
        _flip(path, ALIGN + 3)
    elif damage == "section1_last_byte":
        _flip(path, 2 * ALIGN + LB - 1)
    elif damage == "truncate_mid":
        os.truncate(path, 2 * ALIGN + 100)
    else:
        os.truncate(path, FILE - 1)
    assert read(t, k)[0] is None
    assert not os.path.exists(path)
    assert fail(t, m.CHECKSUM_FAILURES) == 1
    assert not t.contains(k) and t.usage().chunks == 1 and t.usage().used_bytes == FILE
    assert fail(t, m.HITS) == 0
    assert_exact(t, other)
    assert put(t, k)  # it can be stored again
    assert_exact(t, k)


def test_a_section_damaged_after_its_header_was_cached_is_a_miss(tmp_path):
    """The header is parsed once per file; every read still checksums the sections it reads."""
    t = open_tier(tmp_path)
    k = key_of(1)
    put(t, k)
    assert_exact(t, k)  # header verified and cached
    _flip(t.path_of(k), 2 * ALIGN + 7)  # layer 1's section
    assert read(t, k, layers=(1,))[0] is None
    assert not os.path.exists(t.path_of(k)) and fail(t, m.CHECKSUM_FAILURES) == 1


def test_a_file_replaced_after_its_header_was_cached_is_read_from_its_own_header(tmp_path):
    """A chunk file swapped by rename (a new inode) is read through its own header, not the cached one."""
    t = open_tier(tmp_path / "a")
    k = key_of(1)
    put(t, k)
    assert_exact(t, k)
    # the same key's chunk written with another layout of sections: an extra section shifts nothing
    # in the KV payload, but the header differs (one more section), and so does the file size
    other = open_tier(tmp_path / "b")
    layers = payload(k, TINY)
    meta = ChunkMeta(k, ROOT_KEY, 0, CHUNK, tuple(checksum(x) for x in layers), ((SECTION_SUMMARY, 0, b"x" * 5000),))
    assert other.write(meta, layers)
    os.replace(other.path_of(k), t.path_of(k))
    got = assert_exact(t, k, layers=(0, 1, 0))
    assert got.extras == ((SECTION_SUMMARY, 0, b"x" * 5000),)
    assert fail(t, m.CHECKSUM_FAILURES) == 0


def test_corrupt_extra_section_is_a_miss(tmp_path):
    t = open_tier(tmp_path)
    k = key_of(1)
    put(t, k, extras=[(SECTION_SUMMARY, 0, b"abcdef")])
    _flip(t.path_of(k), 3 * ALIGN + 2)
    assert t.read_section(k, SECTION_SUMMARY, 0) is None
    assert not os.path.exists(t.path_of(k)) and fail(t, m.CHECKSUM_FAILURES) == 1


def test_corrupt_files_are_dropped_at_open(tmp_path):
    t = open_tier(tmp_path)
    good, bad, short = key_of(1), key_of(2), key_of(3)
    for k in (good, bad, short):
        put(t, k)
    t.close()
    _flip(t.path_of(bad), 20)
    os.truncate(t.path_of(short), 100)
    Path(tmp_path, "chunks", "zz").mkdir()
    Path(tmp_path, "chunks", "zz", "notes.txt").write_text("not ours")
    t = open_tier(tmp_path)
    assert t.keys() == [good]
    assert fail(t, m.CHECKSUM_FAILURES) == 2
    assert files_on_disk(tmp_path) == {good: FILE}
    assert Path(tmp_path, "chunks", "zz", "notes.txt").exists()


def test_wrong_layout_is_a_miss(tmp_path):
    other = KVLayout(num_layers=2, num_kv_heads=2, head_size=16)
    t = open_tier(tmp_path, layout=other)
    k = key_of(1)
    put(t, k)
    t.close()
    # A tier of another layout neither serves nor deletes the file.
    t = open_tier(tmp_path)
    assert not t.contains(k) and read(t, k)[0] is None
    assert t.foreign_chunks == 1 and os.path.exists(t.path_of(k))
    t.close()
    # A file of another layout found under an indexed key's path is corrupt: miss, dropped.
    t = open_tier(tmp_path / "mine")
    put(t, k)
    shutil.copyfile(chunk_path(tmp_path, k), t.path_of(k))
    assert read(t, k)[0] is None
    assert fail(t, m.CHECKSUM_FAILURES) == 1 and not os.path.exists(t.path_of(k))


# -- errors while writing ---------------------------------------------------------------------
def test_disk_full_after_one_eviction_is_refused_and_leaves_the_tier_usable(tmp_path, monkeypatch):
    t = open_tier(tmp_path)
    (a,) = chain(t, [1])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TierRefusedError, match="ENOSPC"):
        put(t, key_of(2))
    assert fail(t, m.WRITE_FAILURES) == 1
    assert fail(t, m.EVICTIONS) == 1  # it evicted once to make room, then gave up
    assert not list(Path(tmp_path, "tmp").iterdir())
    assert t.keys() == [] and t.usage().used_bytes == 0
    assert files_on_disk(tmp_path) == {}
    monkeypatch.undo()
    assert put(t, key_of(2))
    assert_exact(t, key_of(2))


def test_enospc_below_capacity_evicts_and_retries_once(tmp_path, monkeypatch):
    """The filesystem fills up (other files share it) long before capacity_bytes: ENOSPC
    evicts a chunk and retries, instead of failing every write while the tier thinks it has room."""
    t = open_tier(tmp_path)
    a0, a1 = chain(t, [1, 2])
    (b0,) = chain(t, [3])
    real = os.writev
    calls = []

    def full_once(fd, bufs):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", full_once)
    assert put(t, key_of(4), parent=b0, depth=1)
    assert fail(t, m.EVICTIONS) == 1 and fail(t, m.WRITE_FAILURES) == 0
    assert set(t.keys()) == {a0, b0, key_of(4)}  # the oldest leaf went; b0, the parent, stayed
    assert_exact(t, key_of(4))
    assert files_on_disk(tmp_path) == dict.fromkeys(t.keys(), FILE)


def test_read_only_filesystem_at_publish_raises(tmp_path, monkeypatch):
    t = open_tier(tmp_path)

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "rename", erofs)
    with pytest.raises(TierWriteError, match="EROFS"):
        put(t, key_of(1))
    assert not list(Path(tmp_path, "tmp").iterdir())
    assert t.usage().chunks == 0 and fail(t, m.WRITE_FAILURES) == 1
    monkeypatch.undo()
    assert put(t, key_of(1))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions, so chmod cannot make a folder read-only")
def test_unwritable_temp_folder_raises(tmp_path):
    t = open_tier(tmp_path)
    os.chmod(tmp_path / "tmp", 0o500)
    try:
        with pytest.raises(TierWriteError, match="EACCES"):
            put(t, key_of(1))
    finally:
        os.chmod(tmp_path / "tmp", 0o700)
    assert put(t, key_of(1))


# -- opening a folder ----------------------------------------------------------------------------
def test_missing_root_is_created_by_the_owner_only(tmp_path):
    root = tmp_path / "a" / "b"
    with pytest.raises(TierUnavailableError, match="does not exist"):
        open_tier(root, read_only=True)
    t = open_tier(root)
    assert (root / "chunks").is_dir() and (root / "tmp").is_dir() and (root / ".owner.lock").is_file()
    t.close()


def test_bad_roots_give_clear_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TierUnavailableError, match="not a folder"):
        open_tier(f)
    with pytest.raises(TierUnavailableError, match="cannot create"):
        open_tier(f / "sub")
    with pytest.raises(TierUnavailableError, match="empty"):
        open_tier("")


def test_unwritable_root_is_refused_at_open(tmp_path, monkeypatch):
    open_tier(tmp_path).close()
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # as a read-only mount
    with pytest.raises(TierUnavailableError, match="not readable and writable.*read_only=True"):
        open_tier(tmp_path)
    open_tier(tmp_path, read_only=True).close()


def test_second_owner_is_refused_readers_are_not(tmp_path):
    t = open_tier(tmp_path)
    with pytest.raises(TierUnavailableError, match="read_only") as e:
        open_tier(tmp_path)
    assert str(os.getpid()) in str(e.value)
    reader = open_tier(tmp_path, read_only=True)
    t.close()
    open_tier(tmp_path).close()
    reader.close()


def test_owner_removes_leftover_temp_files_readers_do_not(tmp_path):
    open_tier(tmp_path).close()
    leftover = tmp_path / "tmp" / f"{key_of(1).hex()}.123.abcd.tmp"
    leftover.write_bytes(b"partial")
    open_tier(tmp_path, read_only=True).close()
    assert leftover.exists()
    open_tier(tmp_path).close()
    assert not leftover.exists()


def test_reader_sees_chunks_committed_after_open_and_never_writes(tmp_path):
    owner = open_tier(tmp_path)
    (a,) = chain(owner, [1])
    reader = open_tier(tmp_path, read_only=True)
    assert reader.keys() == [a]
    b, c = key_of(2), key_of(3)
    put(owner, b, parent=a, depth=1)
    put(owner, c, parent=b, depth=2)
    assert reader.lookup([a, b, c]) == 3  # found by stat
    assert assert_exact(reader, c).parent == b
    assert reader.contains(b)
    owner.delete(b)
    assert read(reader, b)[0] is None  # evicted by the owner: a plain miss
    assert reader.lookup([a, b, c]) == 1
    with pytest.raises(TierWriteError):
        put(reader, key_of(4))
    with pytest.raises(TierWriteError):
        reader.delete(a)
    _flip(owner.path_of(c), ALIGN)
    assert read(reader, c)[0] is None
    assert fail(reader, m.CHECKSUM_FAILURES) == 1
    assert os.path.exists(owner.path_of(c))  # readers never delete
    assert read(owner, c)[0] is None and not os.path.exists(owner.path_of(c))


# -- concurrency -------------------------------------------------------------------------------
def test_threads_writing_and_reading_never_see_wrong_bytes(tmp_path):
    t = open_tier(tmp_path, capacity=12 * FILE)
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                k = key_of(rng.randrange(40))
                if rng.random() < 0.5:
                    put(t, k)
                else:
                    meta, dests = read(t, k)
                    if meta is not None:
                        want = payload(k)
                        assert all(np.array_equal(d, w) for d, w in zip(dests, want, strict=True))
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert fail(t, m.CHECKSUM_FAILURES) == 0
    assert t.usage().used_bytes <= 12 * FILE
    assert files_on_disk(tmp_path) == dict.fromkeys(t.keys(), FILE)
    assert not list(Path(tmp_path, "tmp").iterdir())


def _start_writer(root, seed: int, capacity: int, writes: int | None = None) -> subprocess.Popen:
    """A writer process, started but waiting for _go (so its start-up can overlap other work)."""
    args = [sys.executable, WRITER, str(root), str(seed), str(capacity)]
    if writes is not None:
        args.append(str(writes))
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _go(proc: subprocess.Popen) -> None:
    """Let the writer open the folder; return once it owns it."""
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if line.strip() != b"open":
        proc.kill()
        raise AssertionError(f"writer did not start: {line!r} {proc.communicate()[1].decode()}")


def _check_writer_chunk(t: DiskTier, key: bytes) -> ChunkMeta | None:
    dests = [bytearray(disk_writer.LAYOUT.layer_bytes(CHUNK)) for _ in range(2)]
    meta = t.read(key, [0, 1], dests)
    if meta is not None:
        assert [bytes(d) for d in dests] == [disk_writer.layer_payload(key, layer) for layer in (0, 1)]
    return meta


def test_writer_killed_at_random_points_leaves_only_whole_chunks(tmp_path):
    capacity = 60 * FILE
    rng = random.Random(20240601)
    kills = 30
    waiting = [_start_writer(tmp_path, seed=i, capacity=capacity) for i in range(3)]
    for i in range(kills):
        proc = waiting.pop(0)
        if i + 3 < kills:
            waiting.append(_start_writer(tmp_path, seed=i + 3, capacity=capacity))
        _go(proc)
        time.sleep(rng.uniform(0.0, 0.06))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()

    t = DiskTier(disk_writer.LAYOUT, CHUNK, DiskTierConfig(root=str(tmp_path), capacity_bytes=capacity))
    assert not list(Path(tmp_path, "tmp").iterdir())  # temp files of killed writers are gone
    assert fail(t, m.CHECKSUM_FAILURES) == 0  # no published file was torn
    assert 0 < t.usage().used_bytes <= capacity
    stored = set(t.keys())
    for key in stored:
        meta = _check_writer_chunk(t, key)
        assert meta is not None
        assert meta.depth == 0 or meta.parent in stored  # parents are published before children
    served = 0
    for c in range(disk_writer.NUM_CHAINS):
        keys = disk_writer.chain_keys(c)
        n = t.lookup(keys)
        for key in keys[:n]:
            assert _check_writer_chunk(t, key) is not None
        served += n
    assert served == len(stored)
    assert fail(t, m.CHECKSUM_FAILURES) == 0


def test_reader_process_alongside_writer_process_sees_only_committed_chunks(tmp_path):
    capacity = 20 * FILE  # small, so the owner evicts while the reader reads
    proc = _start_writer(tmp_path, seed=7, capacity=capacity, writes=600)
    _go(proc)
    reader = DiskTier(disk_writer.LAYOUT, CHUNK, DiskTierConfig(root=str(tmp_path), read_only=True))
    rng = random.Random(3)
    hits = 0
    try:
        while proc.poll() is None:
            keys = disk_writer.chain_keys(rng.randrange(disk_writer.NUM_CHAINS))
            for key in keys[: reader.lookup(keys)]:
                hits += _check_writer_chunk(reader, key) is not None
    finally:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert out.strip() == b"done"
    for c in range(disk_writer.NUM_CHAINS):
        keys = disk_writer.chain_keys(c)
        for key in keys[: reader.lookup(keys)]:
            hits += _check_writer_chunk(reader, key) is not None
    assert hits > 0
    assert fail(reader, m.CHECKSUM_FAILURES) == 0


# -- CLI helpers ---------------------------------------------------------------------------------
def test_scan_root_counts_chunks_bytes_and_corrupt_files(tmp_path):
    t = open_tier(tmp_path)
    chain(t, [1, 2, 3])
    _flip(t.path_of(key_of(3)), 0)
    (tmp_path / "tmp" / f"{key_of(9).hex()}.1.ab.tmp").write_bytes(b"x")
    stats = scan_root(tmp_path)
    assert stats["chunks"] == 2 and stats["bytes"] == 2 * FILE
    assert stats["corrupt"] == 1 and stats["temp_files"] == 1
    assert files_on_disk(tmp_path).keys() == {key_of(1), key_of(2), key_of(3)}  # scanning deletes nothing
    with pytest.raises(TierUnavailableError):
        scan_root(tmp_path / "missing")


def test_clear_root_removes_only_kvtier_files(tmp_path):
    t = open_tier(tmp_path)
    chain(t, [1, 2])
    with pytest.raises(TierUnavailableError, match="owned by another process"):
        clear_root(tmp_path)
    t.close()
    (tmp_path / "tmp" / f"{key_of(9).hex()}.1.ab.tmp").write_bytes(b"x")
    bucket = Path(t.path_of(key_of(1))).parent
    (bucket / "keep.txt").write_text("mine")
    (tmp_path / "notes.md").write_text("mine too")
    assert clear_root(tmp_path) == {"chunks": 2, "bytes": 2 * FILE, "temp_files": 1}
    assert files_on_disk(tmp_path) == {}
    assert (bucket / "keep.txt").exists() and (tmp_path / "notes.md").exists()
    assert not (tmp_path / "tmp").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.kvc").write_text("x")
    with pytest.raises(TierUnavailableError, match="does not look like"):
        clear_root(other)
    assert (other / "data.kvc").exists()


# -- issue 15: faults that still hurt ------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_write_never_evicts_an_ancestor_of_its_chunk(tmp_path, policy):
    """The fourth chunk of a chain on a three-chunk disk: its parent is the only leaf, and the
    old fallback evicted the head, making the whole chain unreachable while the write 'succeeded'."""
    t = open_tier(tmp_path, capacity=3 * FILE, policy=policy)
    keys = [key_of(i) for i in range(4)]
    parent = ROOT_KEY
    stored = []
    for d, k in enumerate(keys):
        stored.append(put(t, k, parent, d))
        parent = k
    assert stored == [True, True, True, False]
    assert t.lookup(keys) == 3 and set(t.keys()) == set(keys[:3])
    assert fail(t, m.WRITES_REFUSED) == 1 and fail(t, m.EVICTIONS) == 0
    # another chain may still take the room of this chain's tail (a leaf), never of its head
    assert put(t, key_of(10))
    assert t.lookup(keys) == 2 and t.lookup([key_of(10)]) == 1


def test_a_concurrent_write_never_evicts_the_parent_of_a_write_in_flight(tmp_path, monkeypatch):
    """Thread A writes a child of a0; while its file is being written, thread B needs room and
    a0 is the only leaf: evicting it would publish A's chunk as an orphan."""
    t = open_tier(tmp_path, capacity=2 * FILE)
    (a0,) = chain(t, [1])
    (b0,) = chain(t, [3])
    real = os.writev
    entered, release = threading.Event(), threading.Event()

    def slow_first(fd, bufs):
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", slow_first)
    results = []
    writer = threading.Thread(target=lambda: results.append(put(t, key_of(2), parent=a0, depth=1)))
    writer.start()
    try:
        assert entered.wait(30)  # A evicted b0 for its room and is writing
        assert not put(t, key_of(4))  # B: the only leaf is A's parent, so B is refused
    finally:
        release.set()
        writer.join()
    assert results == [True]
    assert t.lookup([a0, key_of(2)]) == 2 and b0 not in t.keys()
    assert fail(t, m.WRITES_REFUSED) == 1


def test_a_child_whose_parent_is_not_on_disk_is_refused(tmp_path):
    t = open_tier(tmp_path)
    (a0,) = chain(t, [1])
    assert not put(t, key_of(3), parent=key_of(2), depth=1)  # key 2 was never stored
    assert fail(t, m.WRITES_REFUSED) == 1 and t.keys() == [a0]
    assert put(t, key_of(2), parent=a0, depth=1)
    assert put(t, key_of(3), parent=key_of(2), depth=2)


@pytest.mark.parametrize("gone", ["corrupt", "deleted"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_parent_saved_again_under_its_child_is_a_leaf_only_once_the_child_goes(tmp_path, policy, gone):
    """A chunk dropped as corrupt or deleted while its child stays on disk, then saved again: its
    policy restarted its child count at 0, so it could be evicted under its child, and once the
    child left the count stood at -1: never a leaf again, so it stayed forever and, on a full
    disk, every write that only it could make room for was refused."""
    t = open_tier(tmp_path, capacity=2 * FILE, policy=policy)
    a, b = chain(t, [1, 2])
    if gone == "corrupt":
        _flip(t.path_of(a), ALIGN + 3)
        assert read(t, a)[0] is None
    else:
        assert t.delete(a)
    assert t.keys() == [b] and put(t, a)
    # full; b is the parent of the write, so only a could make room, and b is its child
    assert not put(t, key_of(3), parent=b, depth=2)
    assert sorted(t.keys()) == sorted([a, b])
    assert t.delete(b)
    (c,) = chain(t, [3])
    assert put(t, key_of(4), parent=c, depth=1)  # full again; a, a leaf now, makes the room
    assert sorted(t.keys()) == sorted([c, key_of(4)])


def test_header_cache_hits_after_write_and_after_open(tmp_path, monkeypatch):
    from kvtier.tiers import disk as disk_module

    parses = []
    real = disk_module.decode_header

    def counting(raw, file_bytes):
        parses.append(file_bytes)
        return real(raw, file_bytes)

    monkeypatch.setattr(disk_module, "decode_header", counting)
    t = open_tier(tmp_path)
    (k,) = chain(t, [1])
    for _ in range(3):
        assert_exact(t, k)
    assert parses == []  # the header written is the header read
    t.close()
    t = open_tier(tmp_path)
    assert len(parses) == 1  # parsed once at open ...
    for _ in range(3):
        assert_exact(t, k)
    assert len(parses) == 1  # ... and never again while the file is the same


@pytest.mark.parametrize("err", [errno.EIO, errno.EMFILE])
def test_a_transient_io_error_at_open_skips_the_file_and_keeps_it(tmp_path, monkeypatch, err):
    t = open_tier(tmp_path)
    a = chain(t, [1, 2])
    (b0,) = chain(t, [3])
    t.close()
    real = os.open
    bad = t.path_of(a[0])

    def failing_open(path, *args, **kwargs):
        if path == bad:
            raise OSError(err, os.strerror(err))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    t = open_tier(tmp_path)
    monkeypatch.undo()
    assert fail(t, m.CHECKSUM_FAILURES) == 0 and fail(t, m.READ_ERRORS) == 1
    assert fail(t, m.ORPHANS_DROPPED) == 0  # its child waits on it: skipped, not deleted
    assert t.keys() == [b0]
    assert files_on_disk(tmp_path) == dict.fromkeys([*a, b0], FILE)
    t.close()
    t = open_tier(tmp_path)  # the error has passed: all served again
    assert t.lookup(a) == 2
    for k in a:
        assert_exact(t, k)


def test_an_io_error_while_reading_is_a_miss_that_keeps_the_file(tmp_path, monkeypatch):
    t = open_tier(tmp_path)
    a, b = chain(t, [1]), chain(t, [2])
    real = os.preadv
    calls = []

    def eio_once(fd, bufs, offset):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", eio_once)
    assert read(t, a[0])[0] is None  # a miss, not an exception
    assert fail(t, m.READ_ERRORS) == 1 and fail(t, m.CHECKSUM_FAILURES) == 0
    assert t.contains(a[0]) and os.path.exists(t.path_of(a[0]))
    assert_exact(t, b[0])
    assert_exact(t, a[0])  # served again once the error has passed


def test_a_chunk_whose_parent_is_corrupt_at_open_is_dropped(tmp_path):
    t = open_tier(tmp_path)
    a = chain(t, [1, 2, 3])
    (b0,) = chain(t, [4])
    t.close()
    _flip(t.path_of(a[1]), ALIGN + 1)  # the header stays valid; the section does not ...
    _flip(t.path_of(a[1]), 20)  # ... and neither does the header now
    t = open_tier(tmp_path)
    assert sorted(t.keys()) == sorted([a[0], b0])  # a[2] could never be reached: dropped
    assert fail(t, m.CHECKSUM_FAILURES) == 1 and fail(t, m.ORPHANS_DROPPED) == 1
    assert files_on_disk(tmp_path) == dict.fromkeys([a[0], b0], FILE)
    assert t.usage().used_bytes == 2 * FILE
    reader = open_tier(tmp_path, read_only=True)
    assert sorted(reader.keys()) == sorted([a[0], b0])


def test_files_of_another_layout_are_counted_against_capacity(tmp_path, caplog):
    other = KVLayout(num_layers=2, num_kv_heads=2, head_size=16)
    t = open_tier(tmp_path, layout=other)
    chain(t, [1, 2])
    t.close()
    foreign = sum(files_on_disk(tmp_path).values())
    with caplog.at_level("WARNING", logger="kvtier.tiers.disk"):
        t = open_tier(tmp_path, capacity=foreign + 2 * FILE)
    assert t.foreign_chunks == 2 and t.foreign_bytes == foreign
    assert t.usage().used_bytes == foreign
    assert str(tmp_path) in caplog.text and "another KV layout" in caplog.text
    chain(t, [3])
    chain(t, [4])
    assert put(t, key_of(5))  # evicts one of ours: the foreign files take the rest of the room
    assert t.usage().used_bytes == foreign + 2 * FILE
    assert len(files_on_disk(tmp_path)) == 4


def test_reader_keeps_a_corrupt_chunk_a_miss_after_its_first_failed_verify(tmp_path):
    owner = open_tier(tmp_path)
    (a,) = chain(owner, [1])
    reader = open_tier(tmp_path, read_only=True)
    _flip(owner.path_of(a), ALIGN + 5)
    assert reader.lookup([a]) == 1  # not verified yet
    assert read(reader, a)[0] is None
    assert fail(reader, m.CHECKSUM_FAILURES) == 1
    for _ in range(3):
        assert reader.lookup([a]) == 0 and not reader.contains(a)
        assert read(reader, a)[0] is None
    assert fail(reader, m.CHECKSUM_FAILURES) == 1  # one failed verify, not one per load
    assert os.path.exists(owner.path_of(a))  # readers never delete
    assert read(owner, a)[0] is None  # the owner drops it ...
    assert put(owner, a)  # ... and stores it again: a new file the reader serves
    assert reader.lookup([a]) == 1
    assert_exact(reader, a)


def test_reader_forgets_chunks_whose_files_the_owner_removed(tmp_path):
    owner = open_tier(tmp_path)
    a = chain(owner, [1, 2])
    reader = open_tier(tmp_path, read_only=True)
    assert reader.lookup(a) == 2 and reader.usage().chunks == 2
    owner.delete(a[1])
    assert reader.lookup(a) == 1
    assert not reader.contains(a[1])
    assert reader.usage().chunks == 1 and reader.usage().used_bytes == FILE


@pytest.mark.parametrize(
    ("key", "parent", "depth", "match"),
    [
        ("ab" * 16, ROOT_KEY, 0, "must be bytes, got str"),
        (b"k" * 33, ROOT_KEY, 0, "has 33 bytes"),
        (bytearray(32), ROOT_KEY, 0, "must be bytes, got bytearray"),
        (b"k" * 32, b"p" * 16, 1, "parent has 16 bytes"),
        (b"k" * 32, ROOT_KEY, -1, "depth must be an int >= 0"),
    ],
)
def test_bad_keys_and_depths_are_refused_at_the_call(tmp_path, key, parent, depth, match):
    t = open_tier(tmp_path)
    layers = payload(key_of(1))
    with pytest.raises(ValueError, match=match):
        t.write(ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers)), layers)
    if isinstance(key, str):
        with pytest.raises(ValueError, match="must be bytes"):
            read(t, key)
    assert t.usage().chunks == 0 and not list(Path(tmp_path, "tmp").iterdir())
