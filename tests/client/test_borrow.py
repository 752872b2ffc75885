"""StoreClient.borrow: chunks pinned in the client's DRAM pool for reads in place (a GPU worker's
direct loads), for the in-process store and a client of `kvtier serve`: the slots hold the chunks'
bytes, verify() finds absent and corrupt chunks, end() hands them back (the service drops the
corrupt ones) and says when the pins expired before it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvtier.client import InProcessClient, connect
from tests.conftest import CHUNK, TINY, payload
from tests.service.util import ServiceProcess, cleanup, save_chain, service_config, short_tmpdir

CB = TINY.chunk_bytes(CHUNK)


def chain(client, n: int) -> tuple[bytes, list[bytes]]:
    root = client.namespace("borrow").root()
    return root, client.chunk_keys(root, list(range(n * CHUNK)))


def slot_bytes(borrow, i: int) -> bytes:
    slot = borrow.slots[i]
    return bytes(borrow.pool[slot * CB:(slot + 1) * CB])


def check_borrow(client, corrupt_pool) -> None:
    root, keys = chain(client, 4)
    save_chain(client, keys[:3], root).wait()
    b = client.borrow(keys)
    assert b is not None
    assert b.slots[3] == -1 and min(b.slots[:3]) >= 0
    for i in range(3):  # the slot holds the chunk, its sections layer after layer
        assert slot_bytes(b, i) == b"".join(layer.tobytes() for layer in payload(keys[i]))
    assert b.verify(0, 4).wait().failed == (3,)
    assert b.verify(1, 3).wait().failed == ()
    assert b.end() is True and b.end() is True  # a second end() does nothing
    b2 = client.borrow(keys[:3])
    corrupt_pool(b2, 1)
    result = b2.verify(0, 3).wait()
    assert result.failed == (1,) and result.loaded == 1
    assert b2.end() is True
    assert client.lookup(keys).hits == 1  # the corrupt chunk was dropped


def flip(borrow, i: int) -> None:
    borrow.pool[borrow.slots[i] * CB + 5] ^= 0xFF


def test_in_process_borrow() -> None:
    client = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK, "memory": {"capacity_bytes": 8 * CB}}},
                     layout=TINY)
    assert isinstance(client, InProcessClient)
    try:
        assert client.lendable_pool() == client.store.memory.pool_region()
        check_borrow(client, flip)
        assert {e.refs for e in client.store.memory._index.values()} == {0}  # noqa: SLF001 - every pin went back
    finally:
        client.close()


def test_in_process_store_without_dram_lends_nothing(tmp_path) -> None:
    client = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK, "memory": None,
                                                     "disk": {"root": str(tmp_path), "capacity_bytes": 1 << 20}}},
                     layout=TINY)
    try:
        assert client.lendable_pool() is None
        assert client.borrow(chain(client, 1)[1]) is None
    finally:
        client.close()


def test_service_borrow_reads_the_shared_pool_and_reports_corrupt_chunks() -> None:
    folder = short_tmpdir()
    try:
        with ServiceProcess(service_config(folder, slots=8), folder) as service:
            client = service.client()
            try:
                region = client.lendable_pool()
                assert region is not None and region.nbytes == 8 * CB
                check_borrow(client, flip)
                assert client.stats()["host"]["loads"] == 0  # every load_begin had its load_end
                with pytest.raises(ValueError, match="outside"):
                    client.borrow(chain(client, 1)[1]).verify(0, 2)
            finally:
                client.close()
    finally:
        cleanup(folder)


def test_service_borrow_whose_pins_expired_is_not_trusted_and_a_down_service_lends_nothing() -> None:
    folder = short_tmpdir()
    try:
        service = ServiceProcess(service_config(folder, slots=8), folder).start()
        client = connect({"mode": "service", "socket_path": service.socket_path, "lease_timeout_s": 0.3})
        try:
            root, keys = chain(client, 2)
            save_chain(client, keys, root).wait()
            b = client.borrow(keys)
            assert b.verify(0, 2).wait().failed == ()
            time.sleep(0.5)  # past the hold: the service may have given the slots to another save
            assert b.end() is False
            service.stop()
            down = client.borrow(keys)
            assert down.slots == [-1, -1] and down.verify(0, 2).wait().failed == (0, 1)
            assert down.end() is True and len(np.asarray(down.pool)) == 0
        finally:
            client.close()
            if service.proc is not None and service.proc.poll() is None:
                service.stop()
    finally:
        cleanup(folder)
