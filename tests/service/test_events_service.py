"""Service mode: `kvtier serve` with `events` publishes its own tiers' KV events once, under the
engine block hashes each client stored with its chunks (commit extras, SECTION_BLOCK_HASHES)."""

from __future__ import annotations

import os
import time

import pytest

from kvtier.core.codec import SECTION_BLOCK_HASHES, encode_block_hashes
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.events import block_hash_of
from kvtier.router import EventSubscriber, KVIndex
from kvtier.service.config import ServiceConfig
from tests.conftest import CHUNK, TINY, payload
from tests.service.util import ServiceProcess, cleanup, save_chain, service_config, short_tmpdir


def save_with(client, keys, root, extras):
    session = client.begin_save(keys, root, 0)
    for layer in range(TINY.num_layers):
        session.write_layer(layer, [payload(k)[layer] for k in keys])
    return session.commit(extras).wait()


def test_the_service_publishes_its_tiers_under_the_clients_block_hashes():
    folder = short_tmpdir()
    events = {"endpoint": f"ipc://{folder}/ev", "replay_endpoint": f"ipc://{folder}/replay"}
    service = ServiceProcess(service_config(folder, slots=6, events=events), folder).start()
    index = KVIndex(block_size=CHUNK)
    sub = EventSubscriber(index, "host-0", events["endpoint"], replay=events["replay_endpoint"])
    a = b = None
    try:
        time.sleep(0.3)  # the SUB socket joins; a missed first batch is replayed anyway
        a, b = service.client(), service.client()
        root = a.namespace("events").root()
        keys = a.chunk_keys(root, list(range(3 * CHUNK)))
        hashes = [1000 + i for i in range(3)]
        extras = [((SECTION_BLOCK_HASHES, 0, encode_block_hashes(hashes[i - 1] if i else None, [hashes[i]])),)
                  for i in range(3)]
        assert save_with(a, keys, root, extras).in_memory == 3
        plain = b.chunk_keys(root, [7] * (2 * CHUNK))
        save_chain(b, plain, root).wait()  # another client, no hashes: the keys' truncation
        with pytest.raises(ValueError, match="1 keys but 3 extras"):
            save_with(a, a.chunk_keys(root, [9] * CHUNK), root, extras)  # 1 chunk, 3 extras
        deadline = time.monotonic() + 10
        want = set(hashes) | {block_hash_of(k) for k in plain}
        while index.blocks("host-0", "CPU") != want and time.monotonic() < deadline:
            sub.poll(100)
        assert index.blocks("host-0", "CPU") == want
        assert index.score("host-0", hashes) == pytest.approx(3 * 0.8)
        # evictions (6 slots) come out under the same hashes: the view follows the DRAM exactly
        more = a.chunk_keys(root, [5] * (5 * CHUNK))
        save_chain(a, more, root).wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sub.poll(100)
            held = index.blocks("host-0", "CPU")
            if {block_hash_of(k) for k in more} <= held and len(held) <= 6:
                break
        held = index.blocks("host-0", "CPU")
        assert {block_hash_of(k) for k in more} <= held and len(held) <= 6 and index.stats.removed > 0
        assert sub.stats.bad_messages == 0 and sub.stats.duplicates == 0
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        sub.close()
        service.stop()
        cleanup(folder)


def test_bad_events_settings_fail_the_config_naming_the_key():
    folder = short_tmpdir()
    try:
        base = service_config(folder)
        with pytest.raises(ConfigError, match="service.events: events.endpoint must be a ZMQ address"):
            load_config(ServiceConfig, {**base, "events": {"endpoint": "http://nope"}})
        with pytest.raises(ConfigError, match="service.events"):
            load_config(ServiceConfig, {**base, "events": {"endpoint": "tcp://127.0.0.1:0", "colour": 1}})
        assert load_config(ServiceConfig, base).events is None
    finally:
        cleanup(folder)


def test_a_taken_events_port_fails_the_start_and_frees_everything():
    import socket

    folder = short_tmpdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        service = ServiceProcess(service_config(folder, events={"endpoint": f"tcp://127.0.0.1:{port}"}), folder)
        try:
            with pytest.raises(RuntimeError, match=r"events\.endpoint tcp://127\.0\.0\.1:\d+: cannot bind"):
                service.start(timeout=120)
            assert not os.path.exists(service.socket_path) and not os.path.exists(service.shm_path)
        finally:
            cleanup(folder)
