"""kvtier's tiers publish what they gain and lose; a subscriber decoding with vLLM's own classes
reads all of it, resyncs through the replay socket after a gap, and rebuilds the tiers' contents."""

from __future__ import annotations

import socket

import msgspec
import pytest
import zmq

from kvtier.core import metrics as m
from kvtier.core.errors import ConfigError
from kvtier.events import EventsBindError, EventsConfig, KVEventPublisher
from kvtier.events.wire import join_seq
from kvtier.tiers.base import TierChange
from tests.events.helpers import ipc_config, run_traffic, small_store, tier_view

kv_events = pytest.importorskip("vllm.distributed.kv_events")
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class VllmSubscriber:
    """A subscriber written only against vLLM's protocol and classes (as llm-d's or Dynamo's are). As
    vLLM's example subscriber, it takes the first number it sees as the start: kvtier's publisher
    numbers from its incarnation's base, not from 0."""

    def __init__(self, pub: str, replay: str) -> None:
        ctx = zmq.Context.instance()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(pub)
        self.replay = ctx.socket(zmq.DEALER)
        self.replay.connect(replay)
        self.decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
        self.next_seq: int | None = None
        self.view: dict[str, set[int]] = {"CPU": set(), "STORAGE": set()}
        self.events = 0
        self.replayed = 0

    def apply(self, seq: int, payload: bytes) -> None:
        assert self.next_seq is None or seq == self.next_seq
        for ev in self.decoder.decode(payload).events:
            self.events += 1
            if isinstance(ev, kv_events.BlockStored):
                self.view[ev.medium].update(ev.block_hashes)
            elif isinstance(ev, kv_events.BlockRemoved):
                self.view[ev.medium].difference_update(ev.block_hashes)
            else:
                for held in self.view.values():
                    held.clear()
        self.next_seq = seq + 1

    def catch_up(self) -> None:
        self.replay.send_multipart((b"", (self.next_seq or 0).to_bytes(8, "big")))
        while True:
            assert self.replay.poll(5000), "the replay socket did not answer"
            _, _topic, seq_bytes, payload = self.replay.recv_multipart()
            if seq_bytes == END_SEQ:
                return
            seq = int.from_bytes(seq_bytes, "big")
            if self.next_seq is None or seq >= self.next_seq:
                self.replayed += 1
                self.apply(seq, payload)

    def drain(self, drop_first: int = 0) -> None:
        """Read what arrived live, throwing away the first `drop_first` new batches (a forced gap)."""
        while self.sub.poll(200):
            _topic, seq_bytes, payload = self.sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if self.next_seq is not None and seq < self.next_seq:
                continue
            if drop_first > 0:
                drop_first -= 1
                continue
            if self.next_seq is None or seq > self.next_seq:  # joined late, or a gap: replay what came before
                self.catch_up()
            if seq == self.next_seq:
                self.apply(seq, payload)

    def close(self) -> None:
        self.sub.close(linger=0)
        self.replay.close(linger=0)


@pytest.mark.parametrize("batch_max_events", [512, 1])
def test_vllm_subscriber_reads_every_event_resyncs_and_rebuilds_the_tiers(tmp_path, batch_max_events):
    store = small_store(tmp_path)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=batch_max_events))
    sub = VllmSubscriber(pub.endpoint, pub.replay_endpoint)
    try:
        pub.attach_store(store)
        run_traffic(store, prompts=6, seed=1)
        assert pub.flush()
        sub.drain(drop_first=2)  # lose live batches (a late join loses the first ones too)
        if sub.next_seq is None or sub.next_seq < join_seq(pub.incarnation, pub.stats["batches"]):
            sub.catch_up()
        run_traffic(store, prompts=10, seed=2)
        assert pub.flush()
        sub.drain(drop_first=1)
        if sub.next_seq is None or sub.next_seq < join_seq(pub.incarnation, pub.stats["batches"]):
            sub.catch_up()
        assert sub.replayed > 0  # the gap was filled from the replay socket
        assert sub.events == pub.stats["events"] and sub.next_seq == join_seq(pub.incarnation, pub.stats["batches"])
        evictions = {t.name: t.metrics.get(m.EVICTIONS, tier=t.name) for t in store.tiers}
        assert evictions["memory"] > 0 and evictions["disk"] > 0, evictions
        assert sub.view == tier_view(store)
        assert pub.stats["dropped_queue_full"] == 0
    finally:
        sub.close()
        pub.close()
        store.close()


def test_attach_publishes_what_the_tiers_already_hold(tmp_path):
    store = small_store(tmp_path)
    run_traffic(store, prompts=5)
    pub = KVEventPublisher(ipc_config(tmp_path))
    sub = VllmSubscriber(pub.endpoint, pub.replay_endpoint)
    try:
        pub.attach_store(store)
        assert pub.flush()
        sub.catch_up()
        assert sub.view == tier_view(store) and sub.view["CPU"] and sub.view["STORAGE"]
    finally:
        sub.close()
        pub.close()
        store.close()


def test_garbage_on_the_replay_socket_is_counted_and_answered(tmp_path):
    pub = KVEventPublisher(ipc_config(tmp_path))
    pub.publish_cleared()
    assert pub.flush()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(pub.replay_endpoint)
    try:
        for garbage in ([b"", b"not eight bytes"], [b"no delimiter"], [b"", b"12345678", b"extra"]):
            dealer.send_multipart(garbage)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])  # then a good request still works
        replies = []
        while dealer.poll(3000):
            replies.append(dealer.recv_multipart())
            if replies[-1][2] == END_SEQ and any(len(r) == 4 and r[2] != END_SEQ for r in replies):
                break
        assert any(r[2] == join_seq(pub.incarnation, 0).to_bytes(8, "big") for r in replies)
        assert pub.stats["replay_bad_requests"] == 3
    finally:
        dealer.close(linger=0)
        pub.close()


def test_a_taken_port_is_a_clear_error(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(EventsBindError, match=rf"events.endpoint tcp://127.0.0.1:{port}: cannot bind"):
            KVEventPublisher(EventsConfig(f"tcp://127.0.0.1:{port}"))
        with pytest.raises(EventsBindError, match="events.replay_endpoint"):
            KVEventPublisher(EventsConfig(f"ipc://{tmp_path}/ok", f"tcp://127.0.0.1:{port}"))
        # the PUB socket of the failed attempt was released: its address binds again
        KVEventPublisher(EventsConfig(f"ipc://{tmp_path}/ok")).close()
    finally:
        holder.close()


def test_tcp_loopback_with_an_os_chosen_port(tmp_path):
    with KVEventPublisher(EventsConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith(":*")
        pub.publish_cleared()
        assert pub.flush()
        sub = VllmSubscriber(pub.endpoint, pub.replay_endpoint)
        sub.catch_up()
        sub.close()
        assert sub.events == 1


@pytest.mark.parametrize("field, value", [("endpoint", "http://x"), ("encoding", "json"), ("buffer_steps", 0),
                                          ("topic", 3), ("data_parallel_rank", -1)])
def test_bad_config_names_the_key(field, value):
    kw = {"endpoint": "ipc:///tmp/never-bound", field: value}
    with pytest.raises(ConfigError, match=f"events.{field}"):
        EventsConfig(**kw)


def test_a_failing_observer_never_fails_the_tier(tmp_path):
    store = small_store(tmp_path)
    seen: list[TierChange] = []

    def broken(change: TierChange) -> None:
        raise RuntimeError("observer bug")

    try:
        store.memory.add_observer(broken)
        store.memory.add_observer(seen.append)
        run_traffic(store, prompts=6)
        assert store.memory.observer_errors == len(seen) > 0
        stored = {c.key for c in seen if c.kind == "stored"}
        removed = [c.key for c in seen if c.kind == "removed"]
        assert removed and set(store.memory.keys()) <= stored
    finally:
        store.close()


def test_a_chunk_another_storage_tier_still_holds_is_not_reported_removed(tmp_path):
    """Bug: the disk tier and every lower tier publish as STORAGE, and an index keeps one set per
    medium: a disk eviction erased a chunk a lower tier (Redis, a shared folder) still held."""
    from kvtier.core.config import DiskTierConfig, LowerTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.core.keys import chunk_keys
    from kvtier.events import BlockRemoved, BlockStored, KVEventPublisher, block_hash_of
    from kvtier.store import TieredStore
    from tests.conftest import CHUNK, TINY, payload
    from tests.events.helpers import ROOT

    cfg = StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=8 * TINY.chunk_bytes(CHUNK)),
                      disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=1 << 24),
                      lower_tiers=(LowerTierConfig(name="l2", disk=DiskTierConfig(root=str(tmp_path / "l2"),
                                                                                   capacity_bytes=1 << 24)),))
    store = TieredStore(cfg, TINY)
    pub = KVEventPublisher(ipc_config(tmp_path))
    seen: list = []
    pub._put = seen.append  # noqa: SLF001 - the events as the tiers' changes produce them
    pub.attach_store(store)
    keys = chunk_keys(ROOT, list(range(2 * CHUNK)), CHUNK)
    store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    store.flush()
    store.wait_lower(keys, 10)
    h = block_hash_of(keys[1])
    storage = [e for e in seen if isinstance(e, BlockStored) and e.medium == "STORAGE" and h in e.block_hashes]
    assert len(storage) == 1  # announced once, though two storage tiers hold it
    assert store.disk.delete(keys[1])
    assert not any(isinstance(e, BlockRemoved) and e.medium == "STORAGE" for e in seen)  # l2 still holds it
    assert store.lower_tiers[0].delete(keys[1])
    assert [e.block_hashes for e in seen if isinstance(e, BlockRemoved) and e.medium == "STORAGE"] == [[h]]
    pub.close()
    store.close()
