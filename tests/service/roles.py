"""Engine-like client processes for the multi-process tests (run with the spawn context)."""

from __future__ import annotations

import random
import time

from kvtier.client import connect
from tests.conftest import TINY, payload
from tests.service.util import exact, new_dests, save_chain


def _client(socket_path: str):
    return connect({"mode": "service", "socket_path": socket_path})


def scheduler(socket_path: str, chains: list[tuple[bytes, list[bytes]]], rounds: int, work, seed: int,
              worker_done) -> None:
    """Look up and lease random prefixes and hand (keys, lease) to the worker; like an engine
    that prefilled a miss, save what was not found so later rounds hit it."""
    c = _client(socket_path)
    rng = random.Random(seed)
    for _ in range(rounds):
        root, keys = rng.choice(chains)
        keys = keys[: rng.randint(1, len(keys))]
        look = c.lookup(keys, lease=True)
        work.put((keys[: look.hits], look.lease_id))
        if look.hits < len(keys):
            save_chain(c, keys, root).wait()
    work.put(None)
    worker_done.wait(60)  # our leases end with our connection: stay until the worker is through
    c.close()


def worker(socket_path: str, work, results, done) -> None:
    """Load what the scheduler leased, verify it byte for byte, release the lease."""
    c = _client(socket_path)
    loads = failures = 0
    while (item := work.get()) is not None:
        keys, lease_id = item
        if lease_id is None:
            continue
        dests = new_dests(len(keys))
        res = c.load(keys, dests, lease_id=lease_id).wait()
        loads += 1
        if res.failed or not exact(keys, dests):
            failures += 1
        c.release(lease_id)
    results.put(("worker", loads, failures))
    done.set()
    c.close()


def writer(socket_path: str, stop, results, seed: int) -> None:
    """Save fresh chains as fast as possible: eviction pressure."""
    c = _client(socket_path)
    root = c.namespace("pressure").root()
    rng = random.Random(seed)
    saved = 0
    while not stop.is_set():
        start = rng.randrange(1 << 30)
        keys = c.chunk_keys(root, list(range(start, start + 4 * c.chunk_tokens)))
        saved += save_chain(c, keys, root).wait().in_memory
    results.put(("writer", saved, 0))
    c.close()


def victim(socket_path: str, chains: list[list[bytes]], seed: int, ready) -> None:
    """Does everything at once, forever, until SIGKILLed: leases, loads, partial saves."""
    c = _client(socket_path)
    rng = random.Random(seed)
    root = c.namespace("victim").root()
    leases = []
    ready.set()
    while True:
        op = rng.randrange(4)
        if op == 0:
            look = c.lookup(rng.choice(chains), lease=True)
            if look.lease_id is not None:
                leases.append(look.lease_id)
        elif op == 1:
            keys = rng.choice(chains)
            c.load(keys, new_dests(len(keys))).wait()
        elif op == 2:
            start = rng.randrange(1 << 30)
            keys = c.chunk_keys(root, list(range(start, start + 3 * c.chunk_tokens)))
            s = c.begin_save(keys, root, 0)
            for layer in range(TINY.num_layers):
                s.write_layer(layer, [payload(k)[layer] for k in keys])
                time.sleep(rng.random() * 0.002)
            if rng.random() < 0.5:
                s.commit()
        else:
            time.sleep(rng.random() * 0.002)
