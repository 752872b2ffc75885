"""A service client's copies against a dropped connection (audit: stale save, stale borrow).

When any request of a ServiceClient times out, the client closes its connection and the
service at once returns what that connection held (drop_owner): its saves' slots go back to
the free list, another client's save may get them, and its loads' pins end. A save begun
before the drop must then copy nothing more into the pool, and a load or borrow whose
copies ran past the drop must not count as trusted; a load whose own load_end is what timed
out copied while its pins were held, so it still counts. Each test runs a real StoreServer
in this process, so that one of its host ops can be held up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import kvtier.client.service_client as sc
from kvtier.client import connect
from kvtier.core.config import load_config
from kvtier.service.config import ServiceConfig
from kvtier.service.server import StoreServer
from tests.conftest import CHUNK, payload
from tests.service.util import CHUNK_BYTES, cleanup, exact, new_dests, service_config, short_tmpdir, wait_until

TIMEOUT_S = 1.0  # the request timeout of the client whose connection is dropped


@pytest.fixture
def serve() -> Iterator[Callable[[int], StoreServer]]:
    """Start a StoreServer with a pool of `slots` chunks (one slot makes its reuse certain)."""
    started: list[tuple[StoreServer, str]] = []

    def start(slots: int) -> StoreServer:
        folder = short_tmpdir()
        server = StoreServer(load_config(ServiceConfig, service_config(folder, slots=slots)))
        server.start()
        started.append((server, folder))
        return server

    yield start
    for server, folder in started:
        server.stop()
        cleanup(folder)


def client(server: StoreServer, **extra):
    return connect({"mode": "service", "socket_path": server.socket_path, **extra})


def keys_at(c, start: int, n: int = 1) -> tuple[bytes, list[bytes]]:
    root = c.namespace("stale").root()
    return root, c.chunk_keys(root, list(range(start, start + n * CHUNK)))


def stall(server: StoreServer, op: str) -> threading.Event:
    """Make the service's host hold `op` until the returned event is set (then `del` the
    instance attribute to undo it): the request times out on the client meanwhile."""
    real, release = getattr(server.host, op), threading.Event()

    def stalled(*args, **kw):
        release.wait(10)
        return real(*args, **kw)

    setattr(server.host, op, stalled)
    return release


def drop_by_a_timed_out_lookup(server: StoreServer, c, keys: list[bytes]) -> None:
    """Time out one request of `c` (a lookup: a miss) and wait until the service has returned
    everything the connection held."""
    release = stall(server, "lookup")
    assert c.lookup(keys).hits == 0
    release.set()
    del server.host.lookup
    assert wait_until(lambda: server.host.counts() == {"leases": 0, "loads": 0, "saves": 0}, 5)


def test_a_save_stops_writing_once_its_connection_is_dropped(serve, monkeypatch):
    """Bug (stale save): a save begun before another request of its client timed out kept
    writing into its slots, which the service had returned at the disconnect and given to
    another client's save; that save was published with this client's bytes under checksums
    computed from them. Now the stale save copies nothing and its commit reports the chunk
    not saved, naming the lost connection; the other client's chunk loads back exact."""
    server = serve(1)
    a, b = client(server, request_timeout_s=TIMEOUT_S), client(server)
    root, ka = keys_at(a, 0)
    _, kb = keys_at(a, 100)
    save_a = a.begin_save(ka, root, 0)  # reserves the only slot
    assert save_a.slots[0] >= 0
    drop_by_a_timed_out_lookup(server, a, ka)

    save_b = b.begin_save(kb, root, 0)
    assert save_b.slots == save_a.slots  # the slot A reserved, now B's
    for layer, section in enumerate(payload(kb[0])):
        save_b.write_layer(layer, [section])
    copies: list[int] = []
    monkeypatch.setattr(sc, "copy_memory", lambda dst, src, n: copies.append(dst))
    for layer, section in enumerate(payload(ka[0])):  # A's save thread never heard of the drop
        save_a.write_layer(layer, [section])
    monkeypatch.undo()
    assert copies == []

    res_a = save_a.commit().wait()
    assert res_a.in_memory == 0 and "connection its slots were reserved on was lost" in res_a.errors[0]
    assert save_b.commit().wait().in_memory == 1
    dests = new_dests(1)
    assert b.load(kb, dests).wait().loaded == 1 and exact(kb, dests)
    a.close()
    b.close()


def test_a_borrow_whose_connection_was_dropped_is_not_trusted(serve):
    """Bug (stale borrow): end() reported a borrow trusted when another request had dropped its
    connection before end(), though the service unpinned its chunks at the disconnect and
    another client's save reused the slot while the caller was reading it in place."""
    server = serve(1)
    a, b = client(server, request_timeout_s=TIMEOUT_S), client(server)
    root, ka = keys_at(a, 0)
    _, kb = keys_at(a, 100)
    assert a.save(ka, root, 0, [payload(ka[0])]).wait().in_memory == 1
    borrowed = a.borrow(ka)
    slot = borrowed.slots[0]
    assert borrowed.verify(0, 1).wait().loaded == 1
    drop_by_a_timed_out_lookup(server, a, ka)

    assert b.save(kb, root, 0, [payload(kb[0])]).wait().in_memory == 1  # evicts ka, reuses its slot
    read = np.array(borrowed.pool[slot * CHUNK_BYTES:(slot + 1) * CHUNK_BYTES])  # the caller's copy in place
    assert not np.array_equal(read[:len(payload(ka[0])[0])], payload(ka[0])[0])  # B's bytes by now
    assert borrowed.end() is False
    a.close()
    b.close()


@pytest.mark.parametrize("how", ["load", "load_layers", "borrow"])
def test_a_load_whose_own_load_end_times_out_keeps_its_copies(serve, how):
    """The rule is not "any close distrusts": when it is the load's own load_end that times out,
    the connection closes after the copies ended, so the pins were held through them and the
    chunks count as loaded."""
    server = serve(4)
    c = client(server, request_timeout_s=TIMEOUT_S)
    root, keys = keys_at(c, 0, 3)
    assert c.save(keys, root, 0, [payload(k) for k in keys]).wait().in_memory == 3
    release = stall(server, "load_end")
    dests = new_dests(3)
    if how == "borrow":
        borrowed = c.borrow(keys)
        assert borrowed.verify(0, 3).wait().loaded == 3
        for i, slot in enumerate(borrowed.slots):
            chunk = borrowed.pool[slot * CHUNK_BYTES:(slot + 1) * CHUNK_BYTES]
            for layer, dest in enumerate(dests[i]):
                dest[:] = chunk[layer * dest.size:(layer + 1) * dest.size]
        assert borrowed.end() is True
    else:
        load = c.load(keys, dests) if how == "load" else c.load_layers(keys, dests)
        assert load.wait().loaded == 3
    release.set()
    assert exact(keys, dests)
    assert c.service_pid == -1  # the load_end did time out: the connection is down
    c.close()


def test_a_close_waits_for_the_copy_in_flight_before_closing_the_socket(serve, monkeypatch):
    """The service frees a connection's slots when its socket closes, so the client marks the
    session closed (no copy begins after that), waits for the copies into the pool already
    under way, and only then closes the socket."""
    server = serve(1)
    c = client(server)
    root, keys = keys_at(c, 0)
    save = c.begin_save(keys, root, 0)
    session = c._session
    assert session is not None and save.slots[0] >= 0
    entered, release = threading.Event(), threading.Event()
    real_copy = sc.copy_memory

    def blocked_copy(dst: int, src: int, n: int) -> None:
        entered.set()
        assert release.wait(10)
        real_copy(dst, src, n)

    monkeypatch.setattr(sc, "copy_memory", blocked_copy)
    section = payload(keys[0])[0]
    writer = threading.Thread(target=save.write_layer, args=(0, [section]))
    writer.start()
    assert entered.wait(10)

    def set_down() -> None:
        with c._lock:
            c._set_down(session, "was cut off by the test")

    closer = threading.Thread(target=set_down)
    closer.start()
    try:
        assert wait_until(lambda: session.closed_at is not None, 5)  # marked closed first ...
        assert not session.begin_copy()  # no copy begins after that ...
        assert session.sock.fileno() != -1  # ... but the socket stays open while the one under way runs
        closer.join(0.2)
        assert closer.is_alive() and server.host.counts()["saves"] == 1
    finally:
        release.set()
    writer.join(10)
    closer.join(10)
    assert not writer.is_alive() and not closer.is_alive()
    assert session.sock.fileno() == -1
    slot = save.slots[0]
    assert np.array_equal(session.pool[slot * CHUNK_BYTES:slot * CHUNK_BYTES + section.size], section)
    assert wait_until(lambda: server.host.counts()["saves"] == 0, 5)  # the service returned the slot

    save.write_layer(1, [payload(keys[0])[1]])  # after the close: refused, the save abandoned
    res = save.commit().wait()
    assert res.in_memory == 0 and "connection its slots were reserved on was lost" in res.errors[0]
    c.close()
