"""No other local user can hijack the service (issue 15, section 1).

The sockets live in one private folder per user; both ends check the peer's uid; the pool
reaches a client as a descriptor, owner-only, checked; every slot a client is sent is
checked against that pool; files beside the socket are never opened through a symlink.
Tests marked `needs_nobody` act as a second local user with `runuser -u nobody`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from kvtier.client import connect
from kvtier.client.service_client import UntrustedServiceError
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.service import protocol as p
from kvtier.service import shm
from kvtier.service.config import ServiceConfig
from kvtier.service.server import AlreadyRunningError, StoreServer
from tests.conftest import CHUNK, TINY, payload
from tests.service import nobody
from tests.service.fake_server import FakeServer
from tests.service.util import cleanup, exact, new_dests, save_chain, service_config, short_tmpdir, wait_until

needs_nobody = pytest.mark.skipif(nobody.skip_reason() is not None, reason=str(nobody.skip_reason()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another group or user)")
KEY = b"\x01" * 32


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def base(monkeypatch):
    """A stand-in for /tmp (sticky, world-writable) holding the per-user folders."""
    folder = short_tmpdir()
    os.chmod(folder, 0o1777)
    monkeypatch.setattr(shm, "SOCKET_BASE", folder)
    yield folder
    cleanup(folder)


@pytest.fixture
def shared():
    """A sticky folder every user may create files in, like /tmp."""
    folder = short_tmpdir()
    os.chmod(folder, 0o1777)
    yield folder
    cleanup(folder)


def server_for(socket_path: str = "", **extra) -> StoreServer:
    cfg = service_config("/unused")
    cfg["socket_path"] = socket_path
    cfg.update(extra)
    return StoreServer(load_config(ServiceConfig, cfg))


def test_default_sockets_live_in_one_private_folder_per_user():
    uid = os.geteuid()
    assert shm.default_socket_path() == f"/tmp/kvtier-{uid}/kvtier.sock"
    layout_hex = TINY.layout_id(CHUNK)[:6].hex()
    assert shm.default_socket_path(TINY, CHUNK) == f"/tmp/kvtier-{uid}/vllm-{layout_hex}.sock"
    with pytest.raises(ValueError, match="chunk_tokens"):
        shm.default_socket_path(TINY)


def test_the_vllm_connector_uses_the_same_default_socket_function():
    pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vllm is not installed")
    from kvtier.connectors.vllm import connector

    assert connector.default_socket_path is shm.default_socket_path  # one function, no copy


def test_private_folder_socket_pool_and_lock_are_owner_only(base):
    server = server_for()
    server.start()
    try:
        folder = shm.private_dir()
        assert server.socket_path == os.path.join(folder, "kvtier.sock")
        assert mode(folder) == 0o700 and os.stat(folder).st_uid == os.geteuid()
        assert mode(server.socket_path) == 0o600 and mode(server.shm_path) == 0o600
        assert mode(server.lock_path) == 0o600
        with connect({"mode": "service"}) as c:  # the default socket, found by the client too
            root = c.namespace("private").root()
            keys = c.chunk_keys(root, list(range(2 * CHUNK)))
            assert save_chain(c, keys, root).wait().in_memory == 2
            dests = new_dests(2)
            assert c.load(keys, dests).wait().loaded == 2 and exact(keys, dests)
    finally:
        server.stop()
    assert not os.path.exists(server.lock_path) and not os.path.exists(server.socket_path)


@needs_root
def test_with_a_group_the_folder_is_0750_and_socket_and_pool_0660(base):
    gid = 65534
    os.mkdir(shm.private_dir(), 0o700)  # left by an earlier service without a group
    server = server_for(group=str(gid))
    server.start()
    try:
        folder = shm.private_dir()
        assert mode(folder) == 0o750 and os.stat(folder).st_gid == gid
        for path in (server.socket_path, server.shm_path):
            assert mode(path) == 0o660 and os.stat(path).st_gid == gid
    finally:
        server.stop()


@pytest.mark.parametrize("plant", ["wide", "symlink"])
def test_a_private_folder_that_is_not_private_is_refused(base, tmp_path, plant):
    folder = shm.private_dir()
    if plant == "wide":
        os.mkdir(folder)
        os.chmod(folder, 0o755)
    else:
        os.symlink(str(tmp_path), folder)
    with pytest.raises(ConfigError) as e:
        server_for().start()
    assert folder in str(e.value) and "socket_path" in str(e.value) and "kvtier.sock" in str(e.value)
    with pytest.raises(ConfigError, match="private folder"):
        connect({"mode": "service"})


@needs_nobody
def test_nobody_cannot_plant_the_private_folder_to_capture_clients(base):
    folder = shm.private_dir()
    fake = nobody.Listener(os.path.join(folder, "kvtier.sock"), "777")  # folder and socket made by nobody
    try:
        with pytest.raises(ConfigError) as e:
            server_for().start()
        assert folder in str(e.value) and f"owned by uid {nobody.nobody_uid()}" in str(e.value)
        with pytest.raises(ConfigError, match="another user may have created it"):
            connect({"mode": "service"})
    finally:
        fake.stop()
    assert fake.received == []  # the client never connected, let alone sent anything


@needs_nobody
def test_nobody_cannot_capture_a_client_by_creating_the_socket_first(shared):
    path = os.path.join(shared, "kv.sock")
    fake = nobody.Listener(path)
    try:
        with pytest.raises(AlreadyRunningError, match="already answers"):
            server_for(path).start()
        with pytest.raises(UntrustedServiceError, match=f"uid {nobody.nobody_uid()}"):
            connect({"mode": "service", "socket_path": path})
        # the service's probe and the client: each connected, checked the peer, and closed
        assert wait_until(lambda: len(fake.received) == 2)
    finally:
        fake.stop()
    assert fake.received == [0, 0]  # not one byte sent to it


CONNECT = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit()
body = b"\x82\xa2op\xa5hello\xa2id\x01"  # msgpack {"op": "hello", "id": 1}
s.sendall(struct.pack("<I", len(body)) + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
print("refused" if b"permission" in data else "served" if data else "closed")
"""

OPEN = r"""
import sys
try:
    open(sys.argv[1], "r+b")
    print("opened")
except PermissionError:
    print("EACCES")
"""


@needs_nobody
def test_nobody_cannot_connect_nor_open_the_pool(base):
    server = server_for()
    server.start()
    try:
        assert nobody.run(CONNECT, server.socket_path).stdout.strip() == "EACCES"  # the 0700 folder
        assert nobody.run(OPEN, server.shm_path).stdout.strip() == "EACCES"  # the 0600 pool
        os.chmod(shm.private_dir(), 0o755)  # past the folder and the socket's mode, SO_PEERCRED still refuses
        os.chmod(server.socket_path, 0o666)
        assert nobody.run(CONNECT, server.socket_path).stdout.strip() == "refused"
    finally:
        server.stop()


SYMLINK = "import os, sys; os.symlink(sys.argv[1], sys.argv[2])"


@needs_nobody
def test_symlinks_planted_beside_the_socket_are_not_followed(shared, tmp_path):
    secret = tmp_path / "root-only"
    secret.write_bytes(b"secret\n")
    os.chmod(secret, 0o600)
    sock = os.path.join(shared, "kv.sock")

    def plant(name: str) -> None:
        r = nobody.run(SYMLINK, str(secret), os.path.join(shared, name))
        assert r.returncode == 0, r.stderr

    plant("kv.sock.lock")
    with pytest.raises(ConfigError, match="symlink"):
        server_for(sock).start()

    plant("kv2.sock.log")
    cfg_path = tmp_path / "svc.json"
    cfg_path.write_text(json.dumps(service_config(shared, socket_path=os.path.join(shared, "kv2.sock"))))
    with pytest.raises(ConfigError, match="symlink"):
        connect({"mode": "service", "socket_path": os.path.join(shared, "kv2.sock"), "auto_start": True,
                 "service_config": str(cfg_path)})

    # the rest is the vLLM connector's service.json (its module imports vllm)
    pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vllm is not installed")
    from kvtier.connectors.vllm.config import load_connector_config
    from kvtier.connectors.vllm.connector import write_service_config

    target = os.path.join(shared, "kv3.sock.service.json")
    plant(f"kv3.sock.service.json.{os.getpid()}.tmp")
    plant("kv3.sock.service.json")
    write_service_config(target, TINY, load_connector_config({}, CHUNK), os.path.join(shared, "kv3.sock"))
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()  # the planted link was replaced, not followed
    assert json.loads(open(target).read())["layout"]["num_layers"] == TINY.num_layers
    assert secret.read_bytes() == b"secret\n"
    assert [n for n in os.listdir(shared) if n.endswith(".tmp")] == []


def fake_answers(load_slot: int, save_slot: int) -> dict:
    layers = TINY.num_layers
    return {
        "load_begin": lambda m: {"load": 1, "slots": [load_slot] * len(m["keys"]), "tiers": ["memory"] * len(m["keys"]),
                                 "checksums": [[0] * layers] * len(m["keys"]), "hold_s": 30.0},
        "allocate": lambda m: {"save": 1, "slots": [save_slot] * len(m["keys"]), "granted": len(m["keys"]),
                               "hold_s": 30.0},
    }


@pytest.mark.parametrize("slot", [4, 10**9, -2])
def test_a_server_that_sends_a_slot_outside_the_pool_gets_an_error_not_a_crash(tmp_path, slot):
    folder = short_tmpdir()
    sock = os.path.join(folder, "fake.sock")
    fake = FakeServer(sock, folder, fake_answers(slot, slot), slots=4)  # slots 0..3
    try:
        # each on a fresh client: a client cuts off a server that sent an impossible slot
        with connect({"mode": "service", "socket_path": sock}) as c:
            with pytest.raises(p.ProtocolError, match=f"slot {slot} for chunk 0 of a load, outside its pool of 4"):
                c.load([KEY], new_dests(1)).wait()
            assert c.lookup([KEY]).hits == 0  # cut off: a miss until it reconnects
        with connect({"mode": "service", "socket_path": sock}) as c:
            with pytest.raises(p.ProtocolError, match="outside its pool"):
                c.save([KEY], KEY, 0, [payload(KEY)])
        with connect({"mode": "service", "socket_path": sock}) as c:
            load = c.load_layers([KEY], new_dests(1))
            with pytest.raises(p.ProtocolError, match="outside its pool"):
                load.wait()
        assert fake.ops.count("load_begin") == 2 and "load_end" not in fake.ops  # no copy was attempted
    finally:
        fake.close()
        cleanup(folder)


def test_a_pool_other_users_can_open_is_refused(tmp_path):
    folder = short_tmpdir()
    sock = os.path.join(folder, "fake.sock")
    fake = FakeServer(sock, folder, {}, pool_mode=0o606)
    try:
        with pytest.raises(shm.PoolError, match="mode 606"):
            connect({"mode": "service", "socket_path": sock})
    finally:
        fake.close()
        cleanup(folder)


@needs_root
def test_a_pool_owned_by_another_user_is_refused(tmp_path):
    folder = short_tmpdir()
    sock = os.path.join(folder, "fake.sock")
    fake = FakeServer(sock, folder, {}, pool_owner=65534)
    try:
        with pytest.raises(shm.PoolError, match="owned by uid 65534"):
            connect({"mode": "service", "socket_path": sock})
    finally:
        fake.close()
        cleanup(folder)


def test_the_hello_reply_names_no_pool_path():
    folder = short_tmpdir()
    server = server_for(os.path.join(folder, "kv.sock"))
    server.start()
    try:
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.socket_path)
        s.sendall(p.encode({"op": "hello", "id": 1}))
        reply, fds = p.recv_message_with_fds(s, 5, 5, p.MAX_FDS)
        try:
            assert reply is not None and reply["ok"] and len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.stat(server.shm_path).st_ino
            assert not any(isinstance(v, str) and v.startswith("/") for v in reply.values())
        finally:
            for fd in fds:
                os.close(fd)
            s.close()
    finally:
        server.stop()
        cleanup(folder)


def test_a_failed_start_leaves_no_lock_file(tmp_path):
    folder = short_tmpdir()
    sock = os.path.join(folder, "kv.sock")
    cfg = service_config(folder)
    cfg["store"]["memory"]["capacity_bytes"] = 16  # holds no chunk: the start fails after taking the lock
    server = StoreServer(load_config(ServiceConfig, cfg))
    with pytest.raises(ConfigError, match="holds no chunk"):
        server.start()
    assert not os.path.exists(sock + ".lock")
    path = os.path.join(folder, "svc.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([sys.executable, "-m", "kvtier.service", "--config", path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "holds no chunk" in r.stderr
    assert os.listdir(folder) == ["svc.json"]
    cleanup(folder)


def test_a_lock_file_left_by_a_killed_service_is_reused():
    folder = short_tmpdir()
    sock = os.path.join(folder, "kv.sock")
    with open(sock + ".lock", "w") as f:
        f.write("12345\n")
    server = server_for(sock)
    server.start()
    try:
        assert open(sock + ".lock").read().strip() == str(os.getpid())
    finally:
        server.stop()
    assert not os.path.exists(sock + ".lock")
    cleanup(folder)


def test_two_pools_never_share_a_mapping(base):
    """Saves land in the pool the service handed over (no path for a server to redirect)."""
    server = server_for()
    server.start()
    try:
        with connect({"mode": "service"}) as c:
            root = c.namespace("pool").root()
            keys = c.chunk_keys(root, list(range(CHUNK)))
            save_chain(c, keys, root).wait()
            pool = np.memmap(server.shm_path, dtype=np.uint8, mode="r")
            assert any(np.array_equal(pool[i * TINY.chunk_bytes(CHUNK):][:len(payload(keys[0])[0])],
                                      payload(keys[0])[0]) for i in range(32))
            del pool
    finally:
        server.stop()


def test_a_client_trusts_another_users_folder_only_when_it_is_really_theirs(base):
    """A service shared with a group lives in its owner's folder; that folder's name must match its owner."""
    other = 4242
    folder = os.path.join(base, f"kvtier-{other}")
    os.mkdir(folder, 0o750)
    sock = os.path.join(folder, "kvtier.sock")
    if os.geteuid() == 0:
        os.chown(folder, other, -1)
        assert shm.trusted_server_uids(sock) == {os.geteuid(), 0, other}
    os.chown(folder, os.geteuid(), -1)
    with pytest.raises(ConfigError, match=f"not uid {other}'s private folder"):
        shm.trusted_server_uids(sock)


def test_the_vllm_connector_starts_its_service_in_the_private_folder(base):
    """open_client with no socket_path: the per-layout socket, its config and log all land in the 0700 folder."""
    import signal

    pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vllm is not installed")
    from kvtier.connectors.vllm.config import load_connector_config
    from kvtier.connectors.vllm.connector import open_client

    cfg = load_connector_config({"store": {"chunk_tokens": CHUNK,
                                           "memory": {"capacity_bytes": 8 * TINY.chunk_bytes(CHUNK)}}}, CHUNK)
    sock = shm.default_socket_path(TINY, CHUNK)
    client = open_client(cfg, TINY, first=True)
    pid = client.service_pid
    try:
        assert client.socket_path == sock and client.lookup([KEY]).hits == 0
        folder = shm.private_dir()
        assert mode(folder) == 0o700
        assert sorted(os.listdir(folder)) == sorted(os.path.basename(sock) + s
                                                    for s in ("", ".lock", ".log", ".service.json"))
        assert all(mode(os.path.join(folder, n)) == 0o600 for n in os.listdir(folder) if not n.endswith(".sock"))
    finally:
        client.close()
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists(sock), timeout=20)


def test_an_auto_starting_client_creates_the_private_folder_for_its_service(base, tmp_path):
    import signal

    cfg = service_config("/unused")
    cfg.pop("socket_path")  # the service's default, in the folder the client makes
    cfg_path = tmp_path / "svc.json"
    cfg_path.write_text(json.dumps(cfg))
    c = connect({"mode": "service", "auto_start": True, "service_config": str(cfg_path)})
    pid = c.service_pid
    try:
        sock = shm.default_socket_path()
        assert c.socket_path == sock and mode(shm.private_dir()) == 0o700
        assert mode(sock + ".log") == 0o600
    finally:
        c.close()
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not os.path.exists(sock), timeout=20)
