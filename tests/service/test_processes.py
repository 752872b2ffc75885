"""Real processes against a real service: scheduler + worker + writer, SIGKILLed clients."""

import multiprocessing as mp
import os
import random
import signal

import pytest

from tests.service import roles
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

CTX = mp.get_context("spawn")


@pytest.fixture
def service():
    folder = short_tmpdir()
    svc = ServiceProcess(service_config(folder, slots=24), folder).start()  # DRAM only: eviction is loss
    yield svc
    svc.stop()
    cleanup(folder)


def seed_chains(client, n_chains=3, chunks=4):
    chains = []
    for i in range(n_chains):
        root = client.namespace(f"seed-{i}").root()
        keys = client.chunk_keys(root, list(range(chunks * client.chunk_tokens)))
        save_chain(client, keys, root).wait()
        chains.append((root, keys))
    return chains


def test_leased_chunks_are_loaded_intact_under_eviction_pressure(service):
    c = service.client()
    chains = seed_chains(c)
    work = CTX.Queue(maxsize=2)  # at most two leases (8 of 24 slots) outstanding
    results = CTX.Queue()
    stop = CTX.Event()
    w = CTX.Process(target=roles.writer, args=(service.socket_path, stop, results, 3))
    done = CTX.Event()
    k = CTX.Process(target=roles.worker, args=(service.socket_path, work, results, done))
    s = CTX.Process(target=roles.scheduler, args=(service.socket_path, chains, 150, work, 4, done))
    for pr in (w, k, s):
        pr.start()
    s.join(60)
    k.join(60)
    stop.set()
    w.join(60)
    by_role = {}
    for _ in range(2):
        role, n, failures = results.get(timeout=10)
        by_role[role] = (n, failures)
    loads, failures = by_role["worker"]
    assert loads > 20 and failures == 0  # no leased chunk was evicted before its load
    assert by_role["writer"][0] > 24  # the writer really cycled the pool
    slots = c.stats()["slots"]
    assert slots["pinned"] == 0 and slots["reserved"] == 0
    c.close()


def test_sigkilled_clients_leave_nothing_behind(service):
    observer = service.client()
    chains = seed_chains(observer)
    base = observer.stats()
    assert base["clients"] == 1
    rng = random.Random(5)
    for i in range(5):
        ready = CTX.Event()
        v = CTX.Process(target=roles.victim, args=(service.socket_path, [k for _, k in chains], i, ready))
        v.start()
        assert ready.wait(30)
        wait_until(lambda: False, timeout=rng.uniform(0.02, 0.3))
        os.kill(v.pid, signal.SIGKILL)
        v.join(10)
        assert wait_until(lambda: observer.stats()["clients"] == 1)
        st = observer.stats()
        slots = st["slots"]
        assert slots["reserved"] == 0 and slots["pinned"] == 0, slots
        assert slots["free"] + slots["resident"] == slots["slots"] == base["slots"]["slots"]
        assert st["host"] == {"leases": 0, "loads": 0, "saves": 0}
        # and it keeps serving
        root, keys = chains[i % len(chains)]
        save_chain(observer, keys, root).wait()
        dests = new_dests(len(keys))
        assert observer.load(keys, dests).wait().loaded == len(keys) and exact(keys, dests)
    observer.close()
