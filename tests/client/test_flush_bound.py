"""flush through the service is bounded like the client's other calls: the service waits at most
the flush's timeout_s for the store's disk writes, answers "flush_timeout" past it, and the client
waits request_timeout_s longer for that answer. A stuck disk made it hang before."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvtier.client import FlushTimeoutError, connect
from kvtier.core.config import load_config
from kvtier.service import protocol as p
from kvtier.service.config import ServiceConfig
from kvtier.service.server import StoreServer
from tests.conftest import CHUNK, TINY
from tests.service.util import cleanup, save_chain, service_config, short_tmpdir


@pytest.fixture
def stuck_disk():
    """A service whose disk writes wait until the test lets them go (set the event)."""
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder, disk=True)))
    server.start()
    assert server.store is not None and server.store.disk is not None
    disk = server.store.disk
    going = threading.Event()
    real_write = disk.write

    def stuck_write(meta, layers):
        going.wait(120)
        return real_write(meta, layers)

    disk.write = stuck_write  # type: ignore[method-assign]
    try:
        yield server, going
    finally:
        going.set()
        server.stop()
        cleanup(folder)


def test_the_service_answers_a_flush_at_its_bound_while_the_disk_is_stuck(stuck_disk):
    server, _going = stuck_disk
    c = connect({"mode": "service", "socket_path": server.socket_path})
    try:
        root = c.namespace("flush").root()
        assert save_chain(c, c.chunk_keys(root, list(range(2 * CHUNK))), root).wait().in_memory == 2
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(30)
            s.connect(server.socket_path)
            s.sendall(p.encode({"op": "flush", "id": 5, "timeout_s": 0.5}))
            reply = p.recv_message(s, 10, 10)  # before: no answer for as long as the disk is stuck
        finally:
            s.close()
        assert reply is not None and not reply["ok"] and reply["kind"] == "flush_timeout"
        assert "still running after 0.5 s" in reply["error"]
    finally:
        c.close()


def test_a_client_flush_ends_at_its_bound_with_a_clear_error_and_keeps_its_connection(stuck_disk):
    server, going = stuck_disk
    c = connect({"mode": "service", "socket_path": server.socket_path, "request_timeout_s": 2.0})
    try:
        root = c.namespace("flush").root()
        keys = c.chunk_keys(root, list(range(2 * CHUNK)))
        assert save_chain(c, keys, root).wait().in_memory == 2
        look = c.lookup(keys, lease=True)
        started = time.monotonic()
        with pytest.raises(FlushTimeoutError, match="still running after 0.5 s"):
            c.flush(timeout_s=0.5)
        assert time.monotonic() - started < 20.0  # bounded, not a hang
        # the same connection still serves: the lease taken before the flush is still held
        assert c.lookup(keys).hits == 2 and c.reconnects == 0
        c.release(look.lease_id)
        going.set()
        c.flush(timeout_s=30.0)  # the writes end: nothing failed
        assert server.store.disk.contains(keys[0]) and server.store.disk.contains(keys[1])
        for bad in (-1.0, p.MAX_FLUSH_S + 1, float("nan")):
            with pytest.raises(ValueError, match="timeout_s"):
                c.flush(timeout_s=bad)
    finally:
        c.close()


def test_the_service_refuses_a_flush_bound_past_its_longest():
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder)))
    server.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(server.socket_path)
        for bad in (-1.0, p.MAX_FLUSH_S + 1, "soon"):
            s.sendall(p.encode({"op": "flush", "id": 9, "timeout_s": bad}))
            reply = p.recv_message(s, 10, 10)
            assert reply is not None and not reply["ok"] and reply["kind"] == "protocol"
        s.sendall(p.encode({"op": "flush", "id": 10}))  # no bound named: the longest, and nothing to wait for
        reply = p.recv_message(s, 10, 10)
        assert reply is not None and reply["ok"] and reply["errors"] == []
    finally:
        s.close()
        server.stop()
        cleanup(folder)


@pytest.mark.parametrize("memory", [True, False])
def test_an_in_process_flush_takes_the_same_bound(tmp_path, memory):
    store = {"chunk_tokens": CHUNK, "disk": {"root": str(tmp_path), "capacity_bytes": 1 << 30}}
    if memory:
        store["memory"] = {"capacity_bytes": 1 << 20}
    c = connect({"mode": "inprocess", "store": store}, layout=TINY)
    disk = c.store.disk
    going = threading.Event()
    real_write = disk.write

    def stuck_write(meta, layers):
        going.wait(120)
        return real_write(meta, layers)

    disk.write = stuck_write  # type: ignore[method-assign]
    try:
        root = c.namespace("flush").root()
        keys = c.chunk_keys(root, list(range(2 * CHUNK)))
        handle = save_chain(c, keys, root)
        with pytest.raises(FlushTimeoutError, match="still running after 0.5 s"):
            c.flush(timeout_s=0.5)
        going.set()
        c.flush()
        assert not handle.wait().errors and disk.contains(keys[1])
    finally:
        going.set()
        c.close()
