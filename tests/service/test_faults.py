"""Bad input and hostile clients: each gets an error reply or a disconnect; others keep being served."""

import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest

from kvtier.client import ServiceError
from kvtier.core.config import load_config
from kvtier.service import protocol as p
from kvtier.service.config import ServiceConfig
from kvtier.service.server import StoreServer
from tests.service.util import (
    ServiceProcess,
    cleanup,
    exact,
    new_dests,
    save_chain,
    service_config,
    short_tmpdir,
    wait_until,
)


@pytest.fixture(scope="module")
def svc():
    folder = short_tmpdir()
    with socket.socket() as s:  # a free port for the metrics endpoint
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = ServiceProcess(service_config(folder, metrics_port=port), folder).start()
    yield service
    service.stop()
    cleanup(folder)


@pytest.fixture(scope="module")
def good(svc):
    c = svc.client()
    root = c.namespace("faults").root()
    keys = c.chunk_keys(root, list(range(12)))
    save_chain(c, keys, root).wait()
    c.test_keys = keys
    yield c
    c.close()


def raw(svc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(svc.socket_path)
    return s


def ask(s: socket.socket, body: bytes) -> dict | None:
    s.sendall(struct.pack("<I", len(body)) + body)
    return p.recv_message(s, 5)


def still_serves(good) -> None:
    dests = new_dests(3)
    assert good.lookup(good.test_keys).hits == 3
    assert good.load(good.test_keys, dests).wait().loaded == 3 and exact(good.test_keys, dests)


def pack(msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def test_malformed_and_unknown_messages_get_errors(svc, good):
    s = raw(svc)
    cases = [
        (b"\xc1", "protocol"),  # not msgpack
        (pack(7), "protocol"),  # not a map
        (pack({"op": "fly", "id": 3}), "unknown_op"),
        (pack({"id": 4}), "unknown_op"),
        (pack({"op": "lookup", "id": 5, "keys": "abc"}), "protocol"),
        (pack({"op": "lookup", "id": 6, "keys": [1, 2]}), "protocol"),
        (pack({"op": "lookup", "id": 7, "keys": [b"x" * 100]}), "protocol"),
        (pack({"op": "allocate", "id": 8, "keys": [b"k" * 32], "parent": b"p" * 32, "first_depth": -1}), "protocol"),
        (pack({"op": "load_end", "id": 9, "load": 999999}), "unknown_load"),
        (pack({"op": "commit", "id": 10, "save": "x"}), "protocol"),
        (pack({"op": "abort", "id": 11, "save": 424242}), "unknown_save"),
        (pack({"op": "lease", "id": 12, "keys": [b"\x09" * 32]}), "unknown_key"),
        (pack({"op": "release", "id": 13, "lease": 77}), "lease"),
        (pack({"op": "release", "id": 14}), "protocol"),
        (pack({"op": "wait_lower", "id": 15, "keys": [b"k" * 32], "timeout_s": -1}), "protocol"),
        (pack({"op": "wait_lower", "id": 16, "keys": [b"k" * 32], "timeout_s": p.MAX_WAIT_LOWER_S + 1}), "protocol"),
        (pack({"op": "wait_lower", "id": 17, "keys": [b"k" * 32], "timeout_s": "soon"}), "protocol"),
        (pack({"op": "wait_lower", "id": 18, "keys": "abc", "timeout_s": 1}), "protocol"),
        (pack({"op": "renew", "id": 19, "save": 424242, "hold_s": 5}), "unknown_save"),
        (pack({"op": "renew", "id": 20, "hold_s": 5}), "protocol"),
        (pack({"op": "renew", "id": 21, "save": 1, "hold_s": 0}), "invalid"),
        (pack({"op": "trim", "id": 22, "lease": 77, "keys": [b"k" * 32]}), "lease"),
        (pack({"op": "trim", "id": 23, "keys": [b"k" * 32]}), "protocol"),
        (pack({"op": "trim", "id": 24, "lease": 77, "keys": [b"k"]}), "protocol"),
    ]
    for body, kind in cases:
        reply = ask(s, body)
        assert reply is not None and reply["ok"] is False and reply["kind"] == kind, (body, reply)
        still_serves(good)
    reply = ask(s, pack({"op": "wait_lower", "id": 19, "keys": good.test_keys, "timeout_s": 1}))
    assert reply["ok"] and reply["pending"] == 0  # no lower tiers: nothing to wait for
    assert ask(s, pack({"op": "hello", "id": 99}))["ok"]  # the connection is still usable
    s.close()


def test_client_errors_surface_as_service_errors(svc, good):
    with pytest.raises(ServiceError) as e:
        good._call("lease", keys=[b"\x08" * 32])
    assert e.value.kind == "unknown_key"


def test_truncated_and_oversized_messages_disconnect(svc, good):
    s = raw(svc)  # header promises 100 bytes, 10 arrive, then the client stalls
    s.sendall(struct.pack("<I", 100) + b"0123456789")
    still_serves(good)
    reply = p.recv_message(s, 5)  # the service gives up after message_timeout_s
    assert reply is not None and reply["kind"] == "protocol"
    assert s.recv(1) == b""
    s.close()
    s = raw(svc)
    s.sendall(struct.pack("<I", 100) + b"0123")
    s.close()  # truncated by EOF
    s = raw(svc)
    s.sendall(struct.pack("<I", 1 << 31))
    reply = p.recv_message(s, 5)
    assert reply["kind"] == "protocol" and "limit" in reply["error"]
    assert s.recv(1) == b""
    s.close()
    s = raw(svc)
    s.sendall(b"\x01\x00")  # half a header, then EOF
    s.close()
    still_serves(good)


def test_silent_clients_do_not_block_others(svc, good):
    silent = [raw(svc) for _ in range(5)]
    still_serves(good)
    other = svc.client()
    assert other.lookup(good.test_keys).hits == 3
    other.close()
    for s in silent:
        s.close()


def test_metrics_endpoint(svc, good):
    url = f"http://127.0.0.1:{svc.config['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "kvtier_service_clients" in text and 'kvtier_tier_used_bytes{tier="memory"}' in text


def test_socket_and_pool_are_owner_only(svc):
    assert stat.S_IMODE(os.stat(svc.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(svc.shm_path).st_mode) == 0o600


NOBODY = 65534
OUTCOMES = {10: "EACCES", 11: "permission", 12: "closed", 13: "other"}


def connect_as(uid: int, path: str) -> str:
    """Fork a child that drops to `uid` and tries the service; how it was turned away."""
    pid = os.fork()
    if pid == 0:  # child: only raw socket calls, then _exit
        code = 13
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except PermissionError:
                code = 10
            else:
                body = pack({"op": "hello", "id": 1})
                try:
                    s.sendall(struct.pack("<I", len(body)) + body)
                except OSError:
                    pass
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                code = 12 if not data else (11 if msgpack.unpackb(data[4:])["kind"] == "permission" else 13)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return OUTCOMES.get(os.waitstatus_to_exitcode(status), "crashed")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_other_uid_is_refused():
    folder = short_tmpdir()
    svc = ServiceProcess(service_config(folder), folder).start()
    try:
        assert connect_as(NOBODY, svc.socket_path) == "EACCES"  # the 0o600 socket file stops it
        os.chmod(svc.socket_path, 0o666)  # past the file mode, SO_PEERCRED still refuses
        assert connect_as(NOBODY, svc.socket_path) == "permission"
        c = svc.client()  # the owner is still served
        assert c.stats()["clients"] == 1
        c.close()
    finally:
        svc.stop()
        cleanup(folder)


def test_injected_peer_check_refuses():
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder)), peer_allowed=lambda pid, uid, gid: False)
    server.start()
    try:
        from kvtier.client import connect

        with pytest.raises(ServiceError) as e:
            connect({"mode": "service", "socket_path": server.socket_path})
        assert e.value.kind == "permission"
    finally:
        server.stop()
        cleanup(folder)
    assert not os.path.exists(server.socket_path) and not os.path.exists(server.shm_path)


def test_second_service_refuses_and_sigterm_cleans_up():
    folder = short_tmpdir()
    svc = ServiceProcess(service_config(folder), folder).start()
    second = subprocess.run([sys.executable, "-m", "kvtier.service", "--config", svc.config_path],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1 and "already running" in second.stderr
    c = svc.client()
    assert c.lookup([b"\x01" * 32]).hits == 0  # the first one is unharmed
    c.close()
    out = svc.stop()
    assert svc.proc.returncode == 0 and "listening on" in out and "stopped" in out
    assert not os.path.exists(svc.socket_path) and not os.path.exists(svc.shm_path)
    cleanup(folder)


def test_stale_socket_does_not_block_a_restart():
    folder = short_tmpdir()
    disk_cfg = service_config(folder, disk=True)
    svc = ServiceProcess(disk_cfg, folder).start()
    c = svc.client()
    root = c.namespace("restart").root()
    keys = c.chunk_keys(root, list(range(20)))
    save_chain(c, keys, root).wait()
    c.flush()
    c.close()
    svc.stop(sig=9)  # a crash: socket file, pool and lock file are left behind
    assert os.path.exists(svc.socket_path)
    t0 = time.monotonic()
    svc = ServiceProcess(disk_cfg, folder).start()
    started = time.monotonic() - t0
    try:
        c = svc.client()
        look = c.lookup(keys)
        assert look.hits == 5 and look.tiers == ("disk",) * 5
        dests = new_dests(5)
        assert c.load(keys, dests).wait().loaded == 5 and exact(keys, dests)
        c.close()
    finally:
        svc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"restart answered after {started:.2f} s")
    assert wait_until(lambda: True)


def test_a_sigkilled_services_pool_is_swept_by_the_next_service_on_any_socket():
    first_folder, second_folder = short_tmpdir(), short_tmpdir()
    first = ServiceProcess(service_config(first_folder), first_folder).start()
    second = None
    try:
        first.stop(sig=9)  # no shutdown: its pool stays in /dev/shm, nobody holding it
        assert os.path.exists(first.shm_path)
        second = ServiceProcess(service_config(second_folder), second_folder).start()  # another socket
        assert not os.path.exists(first.shm_path)
        assert os.path.exists(second.shm_path)  # its own pool, held while it serves
        c = second.client()
        assert c.lookup([b"\x01" * 32]).hits == 0
        c.close()
    finally:
        if second is not None:
            second.stop()
        cleanup(first_folder)
        cleanup(second_folder)
    assert not os.path.exists(second.shm_path)


def test_sweep_takes_only_unheld_pools_of_its_prefix(tmp_path):
    from kvtier.service.shm import POOL_PREFIX, close_quietly, create_pool, sweep_stale_pools

    folder = str(tmp_path)
    live = os.path.join(folder, POOL_PREFIX + "live")
    mm, fd = create_pool(live, 1 << 16)
    stale = os.path.join(folder, POOL_PREFIX + "stale")
    mm2, fd2 = create_pool(stale, 1 << 16)
    os.close(fd2)  # its owner is gone
    close_quietly(mm2)
    other = os.path.join(folder, "kvtier-0123456789abcdef")  # an older kvtier's pool: no flock to trust
    open(other, "wb").close()
    assert [n for n in os.listdir(folder) if n.startswith(".")] == []  # no temporary name left behind
    try:
        assert sweep_stale_pools(folder) == [stale]
        assert sorted(os.listdir(folder)) == sorted([os.path.basename(live), os.path.basename(other)])
        assert sweep_stale_pools(folder) == []
    finally:
        close_quietly(mm)
        os.close(fd)
    assert sweep_stale_pools(folder) == [live]
