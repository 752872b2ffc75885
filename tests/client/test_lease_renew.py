"""StoreClient.renew in both modes: in process (a fake clock) and through a real StoreServer
in this process (its host's clock replaced, so its reaper expires leases on cue)."""

from __future__ import annotations

import pytest

from kvtier.client import connect
from kvtier.client.api import InProcessClient
from kvtier.core.config import MemoryTierConfig, StoreConfig, load_config
from kvtier.service.config import ServiceConfig
from kvtier.service.protocol import LeaseError
from kvtier.service.server import StoreServer
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY
from tests.service.util import cleanup, save_chain, service_config, short_tmpdir, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_process_renew_keeps_held_leases_and_not_lapsed_ones() -> None:
    clock = Clock()
    cfg = StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=8 * TINY.chunk_bytes(CHUNK)))
    store = TieredStore(cfg, TINY)
    with InProcessClient(store, lease_timeout_s=5.0, clock=clock) as c:
        root = c.namespace("renew").root()
        keys = c.chunk_keys(root, list(range(2 * CHUNK)))
        save_chain(c, keys, root).wait()
        kept = c.lookup(keys[:1], lease=True).lease_id
        lapsed = c.lookup(keys[1:], lease=True).lease_id
        assert kept is not None and lapsed is not None
        clock.now += 4
        assert c.renew([kept]) == [kept]
        clock.now += 2  # 6 s after both lookups
        assert c.renew([kept, lapsed]) == [kept]  # the lapsed one is reaped, never revived
        c.release(kept)
        with pytest.raises(LeaseError):
            c.release(lapsed)
        assert c.renew([kept]) == []
        with pytest.raises(ValueError, match=r"lease_ids\[1\]"):
            c.renew([kept, True])


def test_service_client_renews_in_one_call() -> None:
    folder = short_tmpdir()
    server = StoreServer(load_config(ServiceConfig, service_config(folder, slots=8)))
    server.start()
    clock = Clock()
    assert server.host is not None
    server.host._clock = clock  # the lookups' deadlines, the renewals' and the reaper's
    try:
        c = connect({"mode": "service", "socket_path": server.socket_path, "lease_timeout_s": 5.0})
        root = c.namespace("renew").root()
        keys = c.chunk_keys(root, list(range(2 * CHUNK)))
        save_chain(c, keys, root).wait()
        kept = c.lookup(keys[:1], lease=True).lease_id
        lapsed = c.lookup(keys[1:], lease=True).lease_id
        assert kept is not None and lapsed is not None
        clock.now += 4
        assert c.renew([kept]) == [kept]
        clock.now += 2
        assert wait_until(lambda: server.host.counts()["leases"] == 1, 5)  # the reaper took `lapsed` only
        assert c.renew([kept, lapsed, 777]) == [kept]
        assert c.renew([]) == []
        c.release(kept)
        c.close()
    finally:
        server.stop()
        cleanup(folder)
