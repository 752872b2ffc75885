"""StoreServer.stop() with many clients connected: one deadline for all their threads (it waited
5 s for each before), waits in progress answered at once, and committed chunks still written."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from kvtier.client import connect
from kvtier.core.config import load_config
from kvtier.service import protocol as p
from kvtier.service.config import ServiceConfig
from kvtier.service.host import StoreHost
from kvtier.service.server import StoreServer
from kvtier.store import TieredStore
from tests.conftest import CHUNK
from tests.service.util import cleanup, save_chain, service_config, short_tmpdir, wait_until

STUCK = 6


def ask(path: str, msg: dict) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    s.sendall(p.encode(msg))
    return s


def test_stop_waits_once_for_all_clients_not_once_per_client():
    """Clients whose lookups hang on a stuck shared mount (nothing the store's close waits for)
    cost stop() one deadline in all: it waited 5 s for each of them before."""
    folder = short_tmpdir()
    raw = service_config(folder, disk=True)
    raw["store"]["lower_tiers"] = [{"shared_folder": {"root": os.path.join(folder, "shared"), "owner": True}}]
    cfg = load_config(ServiceConfig, raw)
    server = StoreServer(cfg)
    server.start()
    assert server.store is not None
    mount_back = threading.Event()

    def stuck_mount(*_args, **_kwargs):  # a shared folder on a hung NFS server
        mount_back.wait(120)
        return []

    stuck: list[socket.socket] = []
    saver = None
    try:
        saver = connect({"mode": "service", "socket_path": server.socket_path})
        root = saver.namespace("stop").root()
        committed = saver.chunk_keys(root, list(range(3 * CHUNK)))
        assert save_chain(saver, committed, root).wait().in_memory == 3  # its disk write is queued
        server.store.lookup_lower = stuck_mount  # type: ignore[method-assign]
        missing = saver.chunk_keys(saver.namespace("stop-missing").root(), list(range(CHUNK)))
        stuck = [ask(server.socket_path, {"op": "lookup", "id": 3, "keys": missing, "lease": False})
                 for _ in range(STUCK)]
        assert wait_until(lambda: server.stats()["clients"] == STUCK + 1)
        time.sleep(0.3)  # the lookups reach the stuck mount
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        assert took < 15.0, f"stop took {took:.1f} s"  # before: 5 s for each stuck client (30 s)
        for s in stuck:  # cut off: no reply will come on that connection
            assert p.recv_message(s, 5, 5) is None
    finally:
        mount_back.set()
        for s in stuck:
            s.close()
        if saver is not None:
            saver.close()
        server.stop()
    # what was committed before the stop is on disk: the service's close wrote it
    restarted = StoreServer(cfg)
    restarted.start()
    try:
        c = connect({"mode": "service", "socket_path": restarted.socket_path})
        look = c.lookup(committed)
        assert look.hits == 3 and look.tiers == ("disk",) * 3
        c.close()
    finally:
        restarted.stop()
        cleanup(folder)


def test_a_connection_accepted_as_the_service_stops_is_closed_not_left_open():
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder)))
    server.start()
    stop = threading.Thread(target=server.stop)
    try:
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
        stop.start()
        for s in clients:
            s.settimeout(10)
            try:
                s.connect(server.socket_path)
                s.sendall(p.encode({"op": "stats", "id": 1}))
                p.recv_message(s, 10, 10)  # an answer, or the end of the connection: never a hang
            except OSError:
                pass  # the socket was already gone
            finally:
                s.close()
        stop.join(30)
        assert not stop.is_alive()
    finally:
        server.stop()
        cleanup(folder)


def test_interrupt_waits_ends_a_flush_and_a_wait_lower_in_progress(tmp_path):
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from tests.conftest import TINY, payload

    store = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=1 << 20),
                                    disk=DiskTierConfig(root=str(tmp_path), capacity_bytes=1 << 30)), TINY)
    host = StoreHost(store)
    assert store.disk is not None
    release = threading.Event()
    real_write = store.disk.write

    def stuck_write(meta, layers):
        release.wait(60)
        return real_write(meta, layers)

    store.disk.write = stuck_write  # type: ignore[method-assign]
    root = b"\x00" * 32
    keys = [bytes([i]) * 32 for i in range(1, 3)]
    alloc = host.allocate(1, keys, root, 0)
    for key, slot in zip(keys, alloc.slots, strict=True):
        for layer, data in enumerate(payload(key)):
            store.memory.layer_view(slot, layer)[:] = data
    host.commit(1, alloc.save_id)  # its disk write is stuck
    waiting = host.allocate(2, [b"\x09" * 32], root, 0)  # never committed
    outcomes: dict[str, object] = {}

    def flush() -> None:
        try:
            host.flush(120.0)
            outcomes["flush"] = "returned"
        except Exception as e:  # noqa: BLE001 - the test looks at what it was
            outcomes["flush"] = e

    def wait_lower() -> None:
        outcomes["wait_lower"] = host.wait_lower([b"\x09" * 32], 120.0)

    threads = [threading.Thread(target=flush), threading.Thread(target=wait_lower)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        host.interrupt_waits()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        error = outcomes["flush"]
        assert isinstance(error, p.ServiceError) and error.kind == "stopping"
        assert outcomes["wait_lower"] == 1
        with pytest.raises(p.ServiceError, match="stopping"):
            host.flush(1.0)  # later ones at once
    finally:
        release.set()
        host.abort(2, waiting.save_id)
        host.close()
        store.close()
    assert store.disk.contains(keys[0]) and store.disk.contains(keys[1])


def test_stop_with_a_connection_registered_but_its_thread_not_started_yet():
    """The accept loop registers a connection and its thread under the lock and starts the thread after
    releasing it: a stop() in between found a thread it could not join (RuntimeError)."""
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder)))
    server.start()
    ours, theirs = socket.socketpair()
    try:
        with server._conns_lock:  # what the accept loop holds between registering and starting
            server._conns[10_000] = ours
            server._conn_threads[10_000] = threading.Thread(target=lambda: None)
        server.stop()  # raised "cannot join thread before it is started"
    finally:
        theirs.close()
        server.stop()
        cleanup(folder)
