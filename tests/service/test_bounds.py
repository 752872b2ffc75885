"""The service's bounds an audit found missing:

- an allocate that failed part way through its chain (a huge wait_s overflowed the wait) kept the
  slots it had reserved for the chain's first chunks, for good;
- load_begin waited for its disk promotions without a bound, so a slow disk made the client time
  out and drop its connection, and the service then dropped that client's other leases and saves;
- a regular file at socket_path (a mistyped path) was deleted at start;
- one 16 MiB message of empty msgpack containers unpacked into over a GiB of Python objects.
"""

from __future__ import annotations

import os
import struct
import time

import msgpack
import pytest

from kvtier.client import connect
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.service import protocol as p
from kvtier.service.config import ServiceConfig
from kvtier.service.protocol import ServiceError
from kvtier.service.server import StoreServer
from tests.conftest import CHUNK, TINY, payload
from tests.service.test_host import ROOT, fill, keys, make, on_disk_only
from tests.service.util import cleanup, new_dests, save_chain, service_config, short_tmpdir


def test_an_allocate_that_fails_mid_chain_gives_its_reservations_back():
    store, host = make(slots=4)
    real = store.allocate_memory
    calls = []

    def failing(key, *a, **kw):
        calls.append(key)
        if len(calls) == 3:
            raise OverflowError("timeout value is too large")  # what wait_s=1e300 did
        return real(key, *a, **kw)

    store.allocate_memory = failing
    with pytest.raises(OverflowError):
        host.allocate(1, keys(4), ROOT, 0)
    store.allocate_memory = real
    counts = store.memory.slot_counts()
    assert counts["reserved"] == 0 and counts["free"] == 4  # two slots were reserved for good before
    store.close()


def test_wait_bounds_are_checked_and_capped():
    store, host = make(slots=4)
    assert host.wait_bound(None) is None
    assert host.wait_bound(1e300) == host.max_lease_s  # overflowed Condition.wait before
    for bad in (float("nan"), -1.0):
        with pytest.raises(ServiceError, match="wait_s"):
            host.wait_bound(bad)
    with pytest.raises(ServiceError, match="wait_s"):
        host.load_begin(1, keys(1), wait_s=float("nan"))
    store.close()


def test_load_begin_answers_by_its_wait_bound_and_unpins_what_lands_later(tmp_path):
    store, host = make(slots=8, disk_root=tmp_path)
    ks = keys(2)
    on_disk_only(host, store, ks)
    real = store.read_lower

    def slow(key, layers, dests):  # a throttled disk
        time.sleep(0.5)
        return real(key, layers, dests)

    store.read_lower = slow
    t0 = time.monotonic()
    pins = host.load_begin(1, ks, wait_s=0.05)
    assert time.monotonic() - t0 < 0.45 and pins.slots == [-1, -1]  # not promoted in time: failed chunks
    host.load_end(1, pins.load_id)
    time.sleep(1.2)  # the promotions land meanwhile: promoted into DRAM, and unpinned
    counts = store.memory.slot_counts()
    assert counts["pinned"] == 0 and counts["reserved"] == 0
    store.read_lower = real
    pins = host.load_begin(1, ks, wait_s=0.05)
    assert pins.tiers == ["memory", "memory"]  # the late promotions are DRAM hits now
    host.load_end(1, pins.load_id)
    store.close()


def test_a_slow_load_does_not_cost_the_client_its_lease_and_save():
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder, slots=32, disk=True)))
    server.start()
    try:
        c = connect({"mode": "service", "socket_path": server.socket_path, "request_timeout_s": 1.0})
        root = c.namespace("slow").root()
        on_disk = c.chunk_keys(root, list(range(4 * CHUNK)))
        save_chain(c, on_disk, root).wait()
        c.flush()
        for k in on_disk:
            assert server.store.memory.delete(k)  # disk hits only
        other = c.namespace("other").root()
        leased = c.chunk_keys(other, list(range(2 * CHUNK)))
        save_chain(c, leased, other).wait()
        look = c.lookup(leased, lease=True)
        assert look.hits == 2 and look.lease_id is not None
        real = server.store.read_lower

        def slow(*a, **kw):  # 0.6 s a chunk: the load's promotions outlast the 1 s request timeout
            time.sleep(0.6)
            return real(*a, **kw)

        server.store.read_lower = slow
        third_root = c.namespace("third").root()
        third = c.chunk_keys(third_root, list(range(CHUNK)))
        save = c.begin_save(third, third_root, 0)
        result = c.load(on_disk, new_dests(4)).wait()
        assert result.loaded < 4  # what did not arrive in time is recomputed
        for layer in range(TINY.num_layers):
            save.write_layer(layer, [payload(k)[layer] for k in third])
        assert not save.commit().wait().errors  # the save's slots were dropped with the connection before
        c.release(look.lease_id)  # a LeaseError before: the lease went with the connection
        c.close()
    finally:
        server.stop()
        cleanup(folder)


def test_a_regular_file_at_the_socket_path_is_refused_not_deleted():
    folder = short_tmpdir()
    cfg = load_config(ServiceConfig, service_config(folder))
    with open(cfg.socket_path, "w") as f:
        f.write("precious")
    server = StoreServer(cfg)
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            server.start()
        with open(cfg.socket_path) as f:
            assert f.read() == "precious"
    finally:
        cleanup(folder)


def test_a_message_cannot_unpack_into_millions_of_objects():
    n = p.MAX_MESSAGE_BYTES - 5
    flat = b"\xdd" + struct.pack(">I", n) + b"\x80" * n  # one array of 16M empty maps
    with pytest.raises(p.ProtocolError, match="undecodable"):
        p.decode(flat)  # its length is over MAX_ARRAY_LEN: refused before anything is built
    rows = p.MAX_ARRAY_LEN // 2
    nested = b"\x92" + (b"\xdd" + struct.pack(">I", rows) + b"\x90" * rows) * 2  # 2 x 512k empty arrays
    with pytest.raises(p.ProtocolError, match="more than"):
        p.decode(nested)
    # the largest real messages pass: a 1M-token prompt's keys in 16-token chunks, and their checksums
    msg = {"op": "lookup", "keys": [os.urandom(32) for _ in range(65536)],
           "checksums": [[1 << 60] * 80 for _ in range(4096)]}
    assert p.decode(msgpack.packb(msg, use_bin_type=True)) == msg


def test_the_bounds_leave_real_loads_alone(tmp_path):
    store, host = make(slots=8, disk_root=tmp_path)
    ks = keys(3)
    fill(host, 1, ks)
    pins = host.load_begin(1, ks, wait_s=0.0)  # DRAM hits need no wait at all
    assert pins.tiers == ["memory"] * 3
    host.load_end(1, pins.load_id)
    store.close()


def test_one_failed_expiry_does_not_stop_the_reaper():
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder)))
    server.start()
    try:
        assert server.host is not None
        real, calls = server.host.expire, []

        def expire(*a, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("release of chunk ..., which is not pinned")  # a bug elsewhere, once
            return real(*a, **kw)

        server.host.expire = expire  # type: ignore[method-assign]
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3  # the reaper thread died at the first exception before
    finally:
        server.stop()
        cleanup(folder)
