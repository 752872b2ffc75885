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


STARTER = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # like a vLLM CPU worker pinned to its compute core
from kvtier.client import connect
c = connect({"mode": "service", "socket_path": sys.argv[1], "auto_start": True, "service_config": sys.argv[2]})
print(c.service_pid)
c.close()
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to tell pinned from free")
def test_auto_started_service_is_not_confined_to_the_starters_cpus():
    """Bug: a service auto-started from a process pinned to one core (vLLM's CPU worker starts
    it from its compute process) inherited that pinning and competed with vLLM's compute
    threads for the core: a scheduler lookup that takes 1 ms sometimes took ~1 s."""
    import json
    import subprocess
    import sys

    folder = short_tmpdir()
    cfg = service_config(folder)
    cfg_path = os.path.join(folder, "svc.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    out = subprocess.run([sys.executable, "-c", STARTER, cfg["socket_path"], cfg_path], capture_output=True,
                         text=True, timeout=60, check=True)
    pid = int(out.stdout.split()[-1])
    try:
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists(cfg["socket_path"]))
        cleanup(folder)
