"""StoreClient.watch_pool: where the DRAM pool this client copies through lives, and when it goes
(what a GPU connector page-locks), for the in-process store and a client of `kvtier serve`."""

import ctypes

from kvtier.client import InProcessClient, connect
from kvtier.core.config import DiskTierConfig, StoreConfig
from kvtier.store.tiered import TieredStore
from kvtier.tiers.pool import PoolRegion
from tests.conftest import CHUNK, TINY
from tests.service.util import ServiceProcess, cleanup, save_chain, service_config, short_tmpdir
from tests.tiers.test_pool import Recorder

SLOTS = 8


def pool_holds(region: PoolRegion, client, keys: list[bytes]) -> bool:
    """Every layer section of `keys` (as a load returns them) lies in the region's bytes."""
    from tests.service.util import new_dests

    dests = new_dests(len(keys))
    client.load(keys, dests).wait()
    pool = ctypes.string_at(region.address, region.nbytes)
    return all(bytes(d) in pool for row in dests for d in row)


def chain(client, n: int) -> tuple[bytes, list[bytes]]:
    root = client.namespace("pool-watch").root()
    return root, client.chunk_keys(root, list(range(n * CHUNK)))


def test_in_process_client_reports_its_stores_pool_and_its_closing() -> None:
    client = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK,
                                                     "memory": {"capacity_bytes": SLOTS * TINY.chunk_bytes(CHUNK)}}},
                     layout=TINY)
    assert isinstance(client, InProcessClient)
    rec = Recorder()
    client.watch_pool(rec)
    client.watch_pool(rec)
    region = client.store.memory.pool_region()
    assert rec.calls == [("mapped", region)] and region.nbytes == SLOTS * TINY.chunk_bytes(CHUNK)
    root, keys = chain(client, 3)
    save_chain(client, keys, root).wait()
    assert pool_holds(region, client, keys)
    client.close()
    assert rec.calls == [("mapped", region), ("unmapped", region)]


def test_store_without_dram_has_no_pool_to_report(tmp_path) -> None:
    store = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=None,
                                    disk=DiskTierConfig(root=str(tmp_path), capacity_bytes=1 << 20)), TINY)
    rec = Recorder()
    store.watch_pool(rec)
    store.close()
    assert rec.calls == []


def test_service_client_reports_the_shared_memory_mapping_across_a_restart() -> None:
    folder = short_tmpdir()
    try:
        svc = ServiceProcess(service_config(folder, slots=SLOTS), folder).start()
        client = svc.client()
        rec = Recorder()
        client.watch_pool(rec)
        assert len(rec.calls) == 1 and rec.calls[0][0] == "mapped"
        first = rec.calls[0][1]
        assert first.nbytes >= SLOTS * TINY.chunk_bytes(CHUNK)
        root, keys = chain(client, 2)
        save_chain(client, keys, root).wait()
        assert pool_holds(first, client, keys)  # the region is the pool the client copies out of

        svc.stop()
        assert client.lookup(keys).hits == 0  # the service is gone: a miss, and the session is dropped
        assert rec.calls[-1] == ("unmapped", first)
        svc.start()
        client._retry_at = 0.0  # reconnect now, not after the back-off
        client.lookup(keys)
        assert rec.calls[-1][0] == "mapped" and len(rec.calls) == 3
        second = rec.calls[-1][1]
        client.close()
        assert rec.calls[-1] == ("unmapped", second)
        svc.stop()
    finally:
        cleanup(folder)
