"""Shared-folder tier: several real processes, standing for hosts, on one local folder."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvtier.core import metrics as m
from kvtier.core.codec import ALIGN, checksum
from kvtier.core.config import SharedFolderTierConfig
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import ChunkMeta, TierWriteError
from kvtier.tiers.disk import DiskTier, chunk_path
from kvtier.tiers.shared_folder import SharedFolderTier
from tests.tiers import shared_folder_host as host

HOST = str(Path(host.__file__).resolve())
LAYOUT = host.layout_for(512)
FILE = 3 * ALIGN  # one chunk file: header + two 512-byte sections, each padded to 4 KiB


class Host:
    """One process standing for a host: sends a command, returns its JSON answer."""

    def __init__(self, root, role: str, capacity: int = 1 << 30, layer_bytes: int = 512, rescan_s: float = 0.0):
        args = [sys.executable, HOST, str(root), role, str(capacity), str(layer_bytes), str(rescan_s)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.ready = self._answer()

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"host process died: {self.proc.stderr.read()}")
        return json.loads(line)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str):
        self.send(line)
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def hosts(tmp_path):
    started: list[Host] = []

    def start(role: str, **kw) -> Host:
        h = Host(tmp_path / "shared", role, **kw)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


def chunk_files(root) -> set[str]:
    return {p.stem for p in Path(root, "chunks").glob("*/*.kvc")}


def key_hex(i: int) -> str:
    return host.key_of(i).hex()


# -- across processes -------------------------------------------------------------------------
def test_a_chunk_written_by_one_host_is_found_by_the_others_without_restart(hosts):
    owner = hosts("owner")
    b, c = hosts("member"), hosts("member")
    assert owner.ask("lookup 1,2,3") == 0 and b.ask("lookup 1,2,3") == 0  # each has looked before
    assert b.ask("write 1,2,3") == [True, True, True]
    assert owner.ask("lookup 1,2,3") == 3
    assert c.ask("lookup 1,2,3,4") == 3
    assert [owner.ask("read 3"), c.ask("read 1"), c.ask("read 3")] == ["hit", "hit", "hit"]
    assert owner.ask("write 1,2,3,4,5") == [True] * 5
    assert b.ask("lookup 1,2,3,4,5") == 5 and b.ask("read 5") == "hit"
    assert owner.ask("stats")["chunks"] == 5  # what the others wrote is accounted by the owner


def test_a_prefix_stops_at_its_first_gap_across_hosts(hosts, tmp_path):
    owner, member = hosts("owner"), hosts("member")
    member.ask("write 1,2,3")
    os.unlink(chunk_path(tmp_path / "shared", host.key_of(2)))
    assert owner.ask("lookup 1,2,3") == 1


def test_non_owners_never_evict_and_the_owner_trims_on_rescan(hosts, tmp_path):
    root = tmp_path / "shared"
    owner = hosts("owner", capacity=4 * FILE)
    member = hosts("member", capacity=4 * FILE)
    assert member.ask("write 1,2,3,4,5,6") == [True] * 6
    assert member.ask("write 10,11,12,13") == [True] * 4
    assert len(chunk_files(root)) == 10  # the member never evicts, whatever its capacity
    assert member.ask("stats")["evictions"] == 0
    assert "only the owner" in member.ask("delete 1")["error"]
    assert "only the owner" in member.ask("rescan")["error"]
    report = owner.ask("rescan")
    assert report["adopted"] == 10 and report["evicted"] == 6 and report["chunks"] == 4
    assert report["used_bytes"] == 4 * FILE
    left = chunk_files(root)
    assert len(left) == 4
    # tails of chains go before heads: what is left is a set of whole prefixes
    for chain in ([1, 2, 3, 4, 5, 6], [10, 11, 12, 13]):
        present = [key_hex(i) in left for i in chain]
        assert present == sorted(present, reverse=True)
    assert member.ask("stats")["evictions"] == 0


def test_the_owners_background_rescan_brings_the_folder_back_under_capacity(hosts, tmp_path):
    root = tmp_path / "shared"
    hosts("owner", capacity=3 * FILE, rescan_s=0.05)
    member = hosts("member")
    member.ask("write 1,2,3,4,5,6,7,8")
    deadline = time.monotonic() + 30
    while len(chunk_files(root)) > 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(chunk_files(root)) == 3


def test_a_chunk_deleted_between_lookup_and_load_is_a_miss(hosts):
    owner, member = hosts("owner"), hosts("member")
    member.ask("write 1,2")
    assert member.ask("lookup 1,2") == 2
    assert owner.ask("lookup 1,2") == 2
    assert owner.ask("delete 2") is True
    assert member.ask("read 2") == "miss"  # the member's index said yes: the load is a miss, not an error
    assert member.ask("lookup 1,2") == 1
    assert member.ask("read 1") == "hit"
    assert member.ask("stats")["checksum_failures"] == 0


def test_writes_are_atomic_a_reader_never_sees_part_of_a_chunk(hosts):
    layer_bytes = 1 << 20  # 2 MiB files: a reader polling during the write would catch a partial one
    owner = hosts("owner", layer_bytes=layer_bytes)
    writer = hosts("member", layer_bytes=layer_bytes)
    keys = ",".join(str(i) for i in range(100, 140))
    owner.send(f"poll {keys}")
    writer.send(f"write {keys}")
    assert writer._answer() == [True] * 40
    polled = owner._answer()
    assert polled == {"hit": 40, "wrong": 0, "miss": 0, "never_seen": 0}
    assert owner.ask("stats")["checksum_failures"] == 0


def test_two_hosts_writing_the_same_chunks_at_once_leave_one_whole_copy(hosts, tmp_path):
    a, b, owner = hosts("member"), hosts("member"), hosts("owner")
    keys = ",".join(str(i) for i in range(200, 230))
    a.send(f"write {keys}")
    b.send(f"write {keys}")
    assert a._answer() == [True] * 30 and b._answer() == [True] * 30
    assert len(chunk_files(tmp_path / "shared")) == 30
    assert owner.ask(f"lookup {keys}") == 30
    assert all(owner.ask(f"read {i}") == "hit" for i in range(200, 230))
    assert not list(Path(tmp_path, "shared", "tmp").iterdir())


# -- one process, two hosts' tier objects --------------------------------------------------------
def open_tier(root, owner: bool, **kw) -> SharedFolderTier:
    kw.setdefault("rescan_s", 0.0)
    kw.setdefault("revalidate_s", 0.0)
    return SharedFolderTier(LAYOUT, host.CHUNK, SharedFolderTierConfig(root=str(root), owner=owner, **kw))


def put(tier: SharedFolderTier, i: int, parent: bytes = host.ROOT_KEY, depth: int = 0) -> bytes:
    key = host.key_of(i)
    layers = [host.layer_payload(key, layer, tier.layer_bytes) for layer in range(2)]
    assert tier.write(ChunkMeta(key, parent, depth, host.CHUNK, tuple(checksum(x) for x in layers)), layers)
    return key


def read(tier: SharedFolderTier, key: bytes):
    dests = [np.zeros(tier.layer_bytes, np.uint8) for _ in range(2)]
    return tier.read(key, [0, 1], dests), dests


def test_a_file_that_goes_stale_while_open_is_a_miss_not_an_error(tmp_path, monkeypatch):
    owner, member = open_tier(tmp_path, True), open_tier(tmp_path, False)
    key = put(owner, 1)
    assert member.contains(key)

    def stale(*args):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(os, "preadv", stale)
    assert read(member, key)[0] is None  # NFS: another client removed the file under our handle
    assert member.metrics.get(m.MISSES, tier="shared_folder") == 1
    monkeypatch.undo()
    meta, dests = read(member, key)  # the file is still there: adopted again and read whole
    assert meta is not None and bytes(dests[0]) == host.layer_payload(key, 0, owner.layer_bytes)
    owner.close()
    member.close()


def test_an_adopted_chunk_keeps_its_parent_and_depth(tmp_path):
    owner, member = open_tier(tmp_path, True), open_tier(tmp_path, False)
    k1 = put(member, 1)
    k2 = put(member, 2, k1, 1)
    assert owner.lookup([k1, k2]) == 2
    meta, _ = read(owner, k2)
    assert (meta.parent, meta.depth) == (k1, 1)
    owner.close()
    member.close()


def test_a_corrupt_chunk_is_a_miss_for_a_member_and_deleted_by_the_owner(tmp_path):
    owner, member = open_tier(tmp_path, True), open_tier(tmp_path, False)
    key = put(member, 1)
    path = chunk_path(tmp_path, key)
    with open(path, "r+b") as f:  # flip one payload byte: the header still verifies
        f.seek(ALIGN + 7)
        byte = f.read(1)
        f.seek(ALIGN + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = open_tier(tmp_path, False)
    assert fresh.contains(key)
    assert read(fresh, key)[0] is None
    assert os.path.exists(path)  # a member leaves the deletion to the owner
    assert fresh.metrics.get(m.CHECKSUM_FAILURES, tier="shared_folder") == 1
    assert read(fresh, key)[0] is None  # the same bad file is not read again
    assert fresh.metrics.get(m.CHECKSUM_FAILURES, tier="shared_folder") == 1
    assert read(owner, key)[0] is None
    assert not os.path.exists(path)
    for t in (owner, member, fresh):
        t.close()


def test_a_chunk_of_another_layout_under_the_same_name_is_a_miss(tmp_path):
    other = KVLayout(num_layers=2, num_kv_heads=2, head_size=16, dtype="float32")
    writer = SharedFolderTier(other, host.CHUNK, SharedFolderTierConfig(root=str(tmp_path), owner=True))
    key = host.key_of(1)
    layers = [bytes(other.layer_bytes(host.CHUNK))] * 2
    writer.write(ChunkMeta(key, host.ROOT_KEY, 0, host.CHUNK, tuple(checksum(x) for x in layers)), layers)
    writer.close()
    member = open_tier(tmp_path, False)
    assert not member.contains(key) and read(member, key)[0] is None
    assert os.path.exists(chunk_path(tmp_path, key))
    member.close()


def test_a_member_rewrites_a_chunk_the_owner_evicted(tmp_path):
    owner, member = open_tier(tmp_path, True), open_tier(tmp_path, False)
    key = put(member, 1)
    assert owner.delete(key)
    put(member, 1)
    assert os.path.exists(chunk_path(tmp_path, key))
    owner.close()
    member.close()


def test_the_owner_removes_only_stale_temporary_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fresh, stale = tmp / f"{'ab' * 32}.1.00.tmp", tmp / f"{'cd' * 32}.2.00.tmp"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    owner = open_tier(tmp_path, True, stale_temp_s=3600)
    assert fresh.exists() and not stale.exists()  # another host may still be writing the fresh one
    owner.close()


def test_one_owner_per_folder(tmp_path):
    owner = open_tier(tmp_path, True)
    with pytest.raises(Exception, match="owned by another process"):
        DiskTier(LAYOUT, host.CHUNK, owner_config(tmp_path))
    owner.close()


def owner_config(root):
    from kvtier.core.config import DiskTierConfig

    return DiskTierConfig(root=str(root))


@pytest.mark.parametrize(("kw", "match"), [
    ({"root": ""}, "root"),
    ({"root": "x", "capacity_bytes": 0}, "capacity_bytes"),
    ({"root": "x", "rescan_s": -1}, "rescan_s"),
    ({"root": "x", "revalidate_s": "soon"}, "revalidate_s"),
])
def test_bad_config_names_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        SharedFolderTierConfig(**kw)


def test_config_from_a_file_mapping():
    from kvtier.core.config import load_config

    cfg = load_config(SharedFolderTierConfig, {"root": "/mnt/kv", "capacity_bytes": "2GiB", "owner": True})
    assert (cfg.capacity_bytes, cfg.owner, cfg.rescan_s) == (2 << 30, True, 30.0)
    with pytest.raises(ConfigError, match="capacity_bytes"):
        load_config(SharedFolderTierConfig, {"root": "/mnt/kv", "capacity_bytes": "lots"})


def test_an_unknown_policy_is_refused_at_open(tmp_path):
    with pytest.raises(ConfigError, match="policy 'nope' is unknown"):
        open_tier(tmp_path, True, policy="nope")


def test_a_member_cannot_delete_or_rescan(tmp_path):
    member = open_tier(tmp_path, False)
    with pytest.raises(TierWriteError, match="only the owner"):
        member.delete(host.key_of(1))
    with pytest.raises(TierWriteError, match="only the owner"):
        member.rescan()
    member.close()


def test_other_hosts_hits_reach_the_owners_policy_through_mtimes(hosts, tmp_path):
    root = tmp_path / "shared"
    owner = hosts("owner", capacity=3 * FILE)
    member = hosts("member")
    for i in (1, 2, 3):  # three one-chunk chains, oldest first
        member.ask(f"write {i}")
        time.sleep(0.02)  # file times are coarse (a few ms): keep the three apart
    assert owner.ask("rescan")["adopted"] == 3
    time.sleep(0.02)
    assert member.ask("lookup 1") == 1
    member.ask("touch 1")  # a hit on the member: chunk 1 is now the freshest, not the oldest
    member.ask("write 4")
    report = owner.ask("rescan")
    assert report["touched"] == 1 and report["adopted"] == 1 and report["evicted"] == 1
    assert chunk_files(root) == {key_hex(1), key_hex(3), key_hex(4)}  # lru evicted 2, not 1


def test_without_a_touch_the_owner_evicts_the_oldest(hosts, tmp_path):
    root = tmp_path / "shared"
    owner = hosts("owner", capacity=3 * FILE)
    member = hosts("member")
    for i in (1, 2, 3):
        member.ask(f"write {i}")
        time.sleep(0.02)
    owner.ask("rescan")
    assert member.ask("lookup 1") == 1
    member.ask("write 4")
    report = owner.ask("rescan")
    assert report["touched"] == 0 and report["evicted"] == 1
    assert chunk_files(root) == {key_hex(2), key_hex(3), key_hex(4)}


def test_a_host_extends_a_chain_whose_head_another_host_wrote(tmp_path):
    owner, a, b = open_tier(tmp_path, True), open_tier(tmp_path, False), open_tier(tmp_path, False)
    k1 = put(a, 1)
    k2 = put(b, 2, k1, 1)  # b never looked k1 up: it finds the parent in the folder
    assert owner.lookup([k1, k2]) == 2
    assert read(owner, k2)[0].parent == k1
    for t in (owner, a, b):
        t.close()


def test_the_owner_deletes_only_the_corrupt_copy_it_read_not_one_published_since(tmp_path, monkeypatch):
    """Bug: the owner dropped a chunk that failed its checksum by unlinking its path, which by then
    could hold a good copy another host had renamed over it: lost to every host."""
    import kvtier.tiers.disk as disk_mod

    owner, member = open_tier(tmp_path, True), open_tier(tmp_path, False)
    key = put(owner, 1)
    path = chunk_path(tmp_path, key)
    with open(path, "r+b") as f:  # a torn copy: one payload byte wrong, its header fine
        f.seek(ALIGN + 7)
        b = f.read(1)
        f.seek(ALIGN + 7)
        f.write(bytes([b[0] ^ 0xFF]))
    real = disk_mod._preadv_sections

    def read_then_another_host_publishes(fd, sections, views):
        real(fd, sections, views)
        monkeypatch.setattr(disk_mod, "_preadv_sections", real)
        put(member, 1)  # the same prefix computed on another host: a good copy renamed over the path

    monkeypatch.setattr(disk_mod, "_preadv_sections", read_then_another_host_publishes)
    assert read(owner, key)[0] is None  # the torn copy it read: a miss
    assert os.path.exists(path)  # the good copy stays
    assert read(member, key)[0] is not None
    owner.close()
    member.close()
