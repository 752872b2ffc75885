"""Chunks saved with the engine's block hashes (SECTION_BLOCK_HASHES) are published under them.

A chunk of CHUNK (4) tokens holds two vLLM blocks of 2 tokens here: it fans out into two
BlockStored events (and two BlockRemoved when a tier drops it), chained by parent hash; a chunk
saved without the section is published under the 64-bit truncation of its key.
"""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import pytest
import zmq

from kvtier.core import metrics as m
from kvtier.core.codec import SECTION_BLOCK_HASHES, decode_block_hashes, encode_block_hashes
from kvtier.core.errors import CorruptChunkError
from kvtier.core.keys import chunk_keys
from kvtier.events import BatchCodec, BlockStored, KVEventPublisher, block_hash_of
from kvtier.router import EventSubscriber, KVIndex
from tests.conftest import CHUNK, payload
from tests.events.helpers import ROOT, ipc_config, small_store

BLOCK = CHUNK // 2  # the engine's block size: two blocks per chunk


def engine_hash(tokens: list[int], upto: int) -> int:
    """A stand-in for vLLM's block hash of the block ending at token `upto` (a 64-bit int)."""
    return int.from_bytes(hashlib.sha256(repr(tokens[:upto]).encode()).digest()[-8:], "big")


def save_with_hashes(store, tokens: list[int]) -> list[bytes]:
    keys = chunk_keys(ROOT, tokens, CHUNK)
    extras = []
    for i in range(len(keys)):
        parent = engine_hash(tokens, i * CHUNK) if i else None
        hashes = [engine_hash(tokens, i * CHUNK + (b + 1) * BLOCK) for b in range(CHUNK // BLOCK)]
        extras.append(((SECTION_BLOCK_HASHES, 0, encode_block_hashes(parent, hashes)),))
    store.save(keys, ROOT, 0, [payload(k) for k in keys], extras).wait()
    return keys


def expected_view(store) -> dict[str, set[int | bytes]]:
    view: dict[str, set[int | bytes]] = {"CPU": set(), "STORAGE": set()}
    for tier in store.tiers + store.lower_tiers:
        medium = "CPU" if tier.name == "memory" else "STORAGE"
        for key in tier.keys():
            section = tier.read_section(key, SECTION_BLOCK_HASHES, 0)
            view[medium] |= set(decode_block_hashes(section)[1]) if section is not None else {block_hash_of(key)}
    return view


def test_the_section_round_trips_and_refuses_garbage():
    for parent, hashes in ((None, [1, 2**64 - 1]), (7, [b"\x01" * 32]), (b"p", [0, b""])):
        assert decode_block_hashes(encode_block_hashes(parent, hashes)) == (parent, hashes)
    for bad in ([], [-1], [2**64], [True], ["x"], [b"x" * 256]):
        with pytest.raises(ValueError):
            encode_block_hashes(None, bad)
    good = encode_block_hashes(3, [4, 5])
    for corrupt in (b"", good[:-1], good + b"\x00", b"\x02" + good[1:], good[:3] + b"\x09" + good[4:]):
        with pytest.raises(CorruptChunkError):
            decode_block_hashes(corrupt)


def test_a_chunk_of_two_blocks_fans_out_into_two_events(tmp_path):
    store = small_store(tmp_path, mem_chunks=8, disk_chunks=12)
    pub = KVEventPublisher(ipc_config(tmp_path))
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(pub.endpoint)
    time.sleep(0.2)  # let the SUB socket join before the first batch
    try:
        pub.attach_store(store)
        tokens = list(range(2 * CHUNK))
        keys = save_with_hashes(store, tokens)
        plain = chunk_keys(ROOT, [99] * CHUNK, CHUNK)
        store.save(plain, ROOT, 0, [payload(k) for k in plain]).wait()  # no section: the key's truncation
        store.flush()
        assert pub.flush()
        events = []
        codec = BatchCodec()
        while sock.poll(2000):
            events += codec.decode(sock.recv_multipart()[2]).events
            if sum(isinstance(e, BlockStored) for e in events) >= 2 * 4 + 2:
                break
        cpu = [e for e in events if isinstance(e, BlockStored) and e.medium == "CPU"]
        want = [engine_hash(tokens, BLOCK * (b + 1)) for b in range(4)]
        assert [e.block_hashes for e in cpu] == [[h] for h in want] + [[block_hash_of(plain[0])]]
        assert [e.parent_block_hash for e in cpu[:4]] == [None, *want[:3]]
        assert {e.block_size for e in cpu} == {BLOCK, CHUNK}
        assert cpu[-1].block_size == CHUNK
        assert len(keys) == 2
    finally:
        sock.close(linger=0)
        pub.close()
        store.close()


def test_the_routers_view_equals_the_tiers_block_hashes_after_evictions(tmp_path):
    store = small_store(tmp_path)
    pub = KVEventPublisher(ipc_config(tmp_path))
    index = KVIndex(block_size=BLOCK)
    sub = EventSubscriber(index, "host", pub.endpoint, replay=pub.replay_endpoint)
    try:
        pub.attach_store(store)
        rng = random.Random(3)
        chains = []
        promoted = False
        for p in range(14):
            head = rng.randint(0, 2)
            tokens = [head] * CHUNK + [1000 * p + t for t in range(rng.randint(0, 3) * CHUNK)]
            chains.append(save_with_hashes(store, tokens))
            again = chains[rng.randrange(len(chains))]
            n = store.lookup(again).hits
            if n:  # load it: a disk hit is promoted to DRAM, with its section
                store.load(again[:n], [[np.empty_like(b) for b in payload(k)] for k in again[:n]]).wait()
                promoted = True
        store.flush()
        assert pub.flush()
        deadline = time.monotonic() + 10
        while (sub.last_seq if sub.last_seq is not None else -1) + 1 < pub.stats["batches"] and time.monotonic() < deadline:
            sub.poll(100)
        removed = {t.name: t.metrics.get(m.EVICTIONS, tier=t.name) for t in store.tiers}
        assert removed["memory"] > 0 and removed["disk"] > 0 and promoted, removed
        assert store.disk.metrics.get(m.HITS, tier="disk") > 0  # some loads were served by (and promoted from) disk
        want = expected_view(store)
        assert index.blocks("host", "CPU") == want["CPU"] and want["CPU"]
        assert index.blocks("host", "STORAGE") == want["STORAGE"] and want["STORAGE"]
        assert index.stats.foreign_block_size == 0 and index.stats.removed > 0
        assert pub.stats["bad_block_hashes"] == 0
    finally:
        sub.close()
        pub.close()
        store.close()
