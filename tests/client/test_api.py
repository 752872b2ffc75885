"""The StoreClient contract, run against both implementations (in-process and service)."""

import numpy as np
import pytest

from kvtier.client import InProcessClient, LeaseError, connect
from kvtier.core.errors import ConfigError, LayoutMismatchError, TierUnavailableError
from kvtier.core.layout import KVLayout
from tests.conftest import CHUNK, TINY, payload
from tests.service.util import LB, ServiceProcess, cleanup, exact, new_dests, save_chain, service_config, short_tmpdir

SLOTS = 32


@pytest.fixture(params=["inprocess", "service"])
def client(request):
    if request.param == "inprocess":
        c = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK,
                                                    "memory": {"capacity_bytes": SLOTS * TINY.chunk_bytes(CHUNK)}}},
                    layout=TINY)
        assert isinstance(c, InProcessClient)
        yield c
        c.close()
        return
    folder = short_tmpdir()
    with ServiceProcess(service_config(folder, slots=SLOTS), folder) as svc:
        c = svc.client()
        yield c
        c.close()
    cleanup(folder)


def chain(client, n, start=0):
    root = client.namespace("test-model").root()
    return root, client.chunk_keys(root, list(range(start, start + n * CHUNK)))


def test_roundtrip_lookup_and_exact_load(client):
    assert client.layout == TINY and client.chunk_tokens == CHUNK
    root, keys = chain(client, 5)
    r = save_chain(client, keys[:3], root).wait()
    assert r.chunks == 3 and r.in_memory == 3
    look = client.lookup(keys)
    assert look.hits == 3 and look.tiers == ("memory",) * 3 and look.lease_id is None
    dests = new_dests(3)
    res = client.load(keys[:3], dests).wait()
    assert res.loaded == 3 and res.failed == () and res.tiers == ("memory",) * 3
    assert exact(keys[:3], dests)


def test_layer_subset_load(client):
    root, keys = chain(client, 2)
    save_chain(client, keys, root).wait()
    dests = new_dests(2, layers=1)
    res = client.load(keys, dests, layers=[1]).wait()
    assert res.loaded == 2
    assert exact(keys, dests, layers=[1])


def test_load_reports_exactly_which_chunks_failed(client):
    root, keys = chain(client, 3)
    save_chain(client, keys, root).wait()
    missing = b"\x01" * 32
    batch = [keys[0], missing, keys[2]]
    dests = new_dests(3)
    res = client.load(batch, dests).wait()
    assert res.loaded == 1 and res.failed == (1,) and res.tiers == ("memory", "", "memory")
    assert exact([keys[0]], [dests[0]]) and exact([keys[2]], [dests[2]])


def test_begin_save_invisible_until_commit(client):
    root, keys = chain(client, 2)
    s = client.begin_save(keys, root, 0)
    s.write_layer(0, [payload(k)[0] for k in keys])
    assert client.lookup(keys).hits == 0
    s.write_layer(1, [payload(k)[1] for k in keys])
    assert client.lookup(keys).hits == 0
    assert s.commit().wait().in_memory == 2
    assert client.lookup(keys).hits == 2


def test_commit_with_missing_layers_is_refused_and_frees_slots(client):
    root, keys = chain(client, 2)
    before = client.stats()["slots"]
    s = client.begin_save(keys, root, 0)
    s.write_layer(0, [payload(k)[0] for k in keys])
    with pytest.raises(ValueError, match="layers written"):
        s.commit()
    assert client.lookup(keys).hits == 0
    assert client.stats()["slots"] == before


def test_abort_returns_slots(client):
    root, keys = chain(client, 4)
    before = client.stats()["slots"]
    s = client.begin_save(keys, root, 0)
    s.write_layer(0, [payload(k)[0] for k in keys])
    s.abort()
    assert client.stats()["slots"] == before
    assert client.lookup(keys).hits == 0


def test_same_key_saved_twice_is_stored_once(client):
    root, keys = chain(client, 3)
    a = client.begin_save(keys, root, 0)
    b = client.begin_save(keys, root, 0)
    for s in (a, b):
        for layer in range(TINY.num_layers):
            s.write_layer(layer, [payload(k)[layer] for k in keys])
    a.commit().wait()
    b.commit().wait()
    save_chain(client, keys, root).wait()
    slots = client.stats()["slots"]
    assert slots["resident"] == 3 and slots["reserved"] == 0
    assert slots["free"] + slots["resident"] == slots["slots"]
    dests = new_dests(3)
    assert client.load(keys, dests).wait().loaded == 3 and exact(keys, dests)


def test_lease_and_release(client):
    root, keys = chain(client, 3)
    save_chain(client, keys, root).wait()
    look = client.lookup(keys + [b"\x02" * 32], lease=True)
    assert look.hits == 3 and look.lease_id is not None
    assert client.stats()["slots"]["pinned"] == 3
    dests = new_dests(3)
    res = client.load(keys, dests, lease_id=look.lease_id).wait()
    assert res.loaded == 3 and exact(keys, dests)
    client.release(look.lease_id)
    assert client.stats()["slots"]["pinned"] == 0
    with pytest.raises(LeaseError):
        client.release(look.lease_id)
    with pytest.raises(LeaseError):
        client.release(12345)


def test_trim_drops_part_of_a_lease(client):
    root, keys = chain(client, 4)
    save_chain(client, keys, root).wait()
    look = client.lookup(keys, lease=True)
    assert client.stats()["slots"]["pinned"] == 4
    client.trim(look.lease_id, keys[2:] + [b"\x04" * 32])  # a key the lease does not hold is ignored
    assert client.stats()["slots"]["pinned"] == 2
    dests = new_dests(2)
    assert client.load(keys[:2], dests, lease_id=look.lease_id).wait().loaded == 2 and exact(keys[:2], dests)
    client.trim(look.lease_id, keys[2:])  # trimmed twice: nothing more to drop
    client.release(look.lease_id)
    assert client.stats()["slots"]["pinned"] == 0  # the kept pins ended once, the dropped ones once
    with pytest.raises(LeaseError):
        client.trim(look.lease_id, keys[:1])
    with pytest.raises(ValueError):
        client.trim(12345, [b"short"])


def test_a_leased_chunk_a_borrow_found_corrupt_is_released_cleanly(client):
    """Bug (in-process): a lease pinned by key; a borrow that found the chunk corrupt unindexed it,
    so the lease's release raised and leaked the slot and the lease's other pins."""
    root, keys = chain(client, 2)
    save_chain(client, keys, root).wait()
    client.flush()
    lease = client.lookup(keys, lease=True).lease_id
    borrowed = client.borrow(keys, lease)
    assert borrowed is not None
    cb = TINY.chunk_bytes(CHUNK)
    borrowed.pool[borrowed.slots[0] * cb + 5] ^= 0xFF  # a bit flips in DRAM
    assert borrowed.verify(0, 2).wait().failed == (0,)
    assert borrowed.end() is True  # the pins held: the one failed chunk is reported by verify
    client.release(lease)
    assert client.lookup(keys).hits == 0  # the corrupt chunk is gone (its child stays until evicted)
    slots = client.stats()["slots"]
    assert slots["pinned"] == 0 and slots["free"] + slots["resident"] + slots["reserved"] == slots["slots"]


def test_lease_on_nothing_returns_no_lease(client):
    root, keys = chain(client, 2)
    assert client.lookup(keys, lease=True) == type(client.lookup(keys))(0, (), None)


def test_load_with_lost_lease_still_reports_exact_failures(client):
    root, keys = chain(client, 2)
    save_chain(client, keys, root).wait()
    look = client.lookup(keys, lease=True)
    client.release(look.lease_id)
    dests = new_dests(3)
    res = client.load(keys + [b"\x03" * 32], dests, lease_id=look.lease_id).wait()
    assert res.loaded == 2 and res.failed == (2,)


def test_leased_chunks_survive_eviction_pressure(client):
    root, keys = chain(client, 4)
    save_chain(client, keys, root).wait()
    look = client.lookup(keys, lease=True)
    for i in range(1, 12):  # 44 more chunks through a 32-slot pool
        r2, more = chain(client, 4, start=1000 * i)
        save_chain(client, more, r2).wait()
    assert client.lookup(keys).hits == 4
    dests = new_dests(4)
    assert client.load(keys, dests, lease_id=look.lease_id).wait().loaded == 4
    assert exact(keys, dests)
    client.release(look.lease_id)


def test_bad_arguments(client):
    root, keys = chain(client, 2)
    with pytest.raises(ValueError):
        client.load(keys, [[np.zeros(LB, np.uint8)]])
    with pytest.raises(ValueError):
        client.load(keys[:1], [[np.zeros(LB - 1, np.uint8), np.zeros(LB, np.uint8)]])
    with pytest.raises(ValueError):
        client.save(keys, root, 0, [])


def test_stats_and_flush(client):
    root, keys = chain(client, 2)
    save_chain(client, keys, root).wait()
    client.flush()
    st = client.stats()
    assert st["memory"]["chunks"] == 2 and st["slots"]["slots"] == SLOTS


def test_connect_errors():
    with pytest.raises(ConfigError, match="layout"):
        connect({"mode": "inprocess"})
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        connect({"bogus": 1})
    with pytest.raises(TierUnavailableError, match="no kvtier service"):
        connect({"mode": "service", "socket_path": "/tmp/kvtier-test-nothing-here.sock"})


def test_service_layout_mismatch_is_refused():
    folder = short_tmpdir()
    with ServiceProcess(service_config(folder), folder) as svc:
        with pytest.raises(LayoutMismatchError):
            svc.client(layout={"num_layers": 3, "num_kv_heads": 2, "head_size": 8})
        assert svc.client(layout=KVLayout(2, 2, 8)).layout == TINY
    cleanup(folder)


def test_auto_start(tmp_path):
    import json
    import os
    import signal

    folder = short_tmpdir()
    cfg = service_config(folder)
    cfg_path = os.path.join(folder, "svc.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    c = connect({"mode": "service", "socket_path": cfg["socket_path"], "auto_start": True,
                 "service_config": cfg_path})
    try:
        root, keys = chain(c, 2)
        save_chain(c, keys, root).wait()
        assert c.lookup(keys).hits == 2
        pid = c.service_pid
    finally:
        c.close()
    os.kill(pid, signal.SIGTERM)
    from tests.service.util import wait_until
    assert wait_until(lambda: not os.path.exists(cfg["socket_path"]))
    cleanup(folder)



def test_load_layers_hands_over_each_layer_in_order(client):
    root, keys = chain(client, 3)
    save_chain(client, keys, root).wait()
    missing = b"\x02" * 32
    batch = [keys[0], missing, keys[1], keys[2]]
    dests = new_dests(4)
    load = client.load_layers(batch, dests)
    for layer in range(TINY.num_layers):
        load.wait_layer(layer)  # every chunk that loads has this layer (the missing one is skipped)
        assert all(np.array_equal(dests[i][layer], payload(batch[i])[layer]) for i in (0, 2, 3))
    res = load.wait()
    assert res.failed == (1,) and res.loaded == 1 and res.tiers == ("memory", "", "memory", "memory")
    assert exact([keys[0], keys[1], keys[2]], [dests[0], dests[2], dests[3]])
