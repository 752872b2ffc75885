"""A restarted publisher is told from the dead one by the incarnation in its sequence numbers, even
when its first batches never reached the subscriber; vLLM's own numbering (no incarnation) keeps
the stamp rule."""

from __future__ import annotations

import time

import pytest

from kvtier.events import BatchCodec, BlockStored, EventsConfig, KVEventPublisher
from kvtier.events.wire import SEQ_COUNTER_BITS, join_seq, split_seq
from kvtier.router import EventSubscriber, KVIndex
from tests.events.helpers import ipc_config


def stored(h: int) -> BlockStored:
    return BlockStored([h], None, [], 4, None, "CPU", None)


def drain(sub: EventSubscriber, want, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sub.poll(100)
        if want():
            return True
    return False


@pytest.mark.parametrize("lost", [5, 7])  # the next batch numbers one past the dead one's last; or past that
def test_a_restarted_publisher_whose_first_batches_were_lost_replaces_the_dead_ones_view(tmp_path, lost):
    """Bug: a restart was recognised only by a number at or below the last one applied. When the new
    process's first batches were lost (ZMQ's slow joiner) and its next one numbered one past the dead
    process's last, it was applied on top of the dead process's view; a larger number was a gap, and
    the new process's replay was applied on top of it as well."""
    index = KVIndex(block_size=4)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1))
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.2)
        for h in range(1, 6):
            pub._put(stored(h))
        assert pub.flush()
        assert drain(sub, lambda: sub.last_seq == 4 and index.blocks("e", "CPU") == {1, 2, 3, 4, 5})
        pub.close()
        pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1))  # the service restarts
        time.sleep(0.5)
        for h in range(100, 100 + lost):
            pub._put(stored(h))
        assert pub.flush()
        time.sleep(0.2)
        while sub._sub.poll(300):  # the new process's first batches never reach the subscriber
            sub._sub.recv_multipart()
        pub._put(stored(100 + lost))  # numbered `lost`: one past the dead process's last when lost == 5
        assert pub.flush()
        want = set(range(100, 101 + lost))
        assert drain(sub, lambda: index.blocks("e", "CPU") == want), (index.blocks("e", "CPU"), sub.stats)
        assert sub.stats.restarts == 1 and sub.stats.unrecovered_gaps == 0
        assert sub.incarnation == pub.incarnation and sub.last_seq == lost
    finally:
        sub.close()
        pub.close()


def test_sequence_numbers_carry_the_incarnation_and_still_count_up_by_one(tmp_path):
    pubs = [KVEventPublisher(EventsConfig(f"ipc://{tmp_path}/pub{i}")) for i in range(2)]
    try:
        assert all(0 < p.incarnation < 1 << 23 for p in pubs) and pubs[0].incarnation != pubs[1].incarnation
        assert split_seq(join_seq(pubs[0].incarnation, 5)) == (pubs[0].incarnation, 5)
        assert join_seq(pubs[0].incarnation, 0) == pubs[0].incarnation << SEQ_COUNTER_BITS < 1 << 63  # never negative
    finally:
        for p in pubs:
            p.close()
    with pytest.raises(ValueError, match="incarnation"):
        KVEventPublisher(EventsConfig(f"ipc://{tmp_path}/bad"), incarnation=1 << 23)


def test_without_an_incarnation_a_batch_stamped_later_is_still_a_restart(tmp_path):
    """vLLM's publisher numbers from 0 with no incarnation: a number at or below the last one applied
    is a duplicate, unless it is stamped after every batch applied (then a restart)."""
    codec = BatchCodec()
    index = KVIndex(block_size=4)
    sub = EventSubscriber(index, "e", f"ipc://{tmp_path}/unused")

    def frames(seq: int, h: int, ts: float) -> list[bytes]:
        return [b"", seq.to_bytes(8, "big"), codec.encode(ts, [stored(h)])]

    try:
        for seq in range(3):
            sub._receive(frames(seq, seq + 1, 10.0 + seq), live=True)
        sub._receive(frames(1, 2, 11.0), live=True)  # a replayed batch arriving again live
        assert sub.stats.duplicates == 1 and index.blocks("e", "CPU") == {1, 2, 3}
        sub._receive(frames(0, 50, 20.0), live=True)  # a new process, batch 0
        assert sub.stats.restarts == 1 and index.blocks("e", "CPU") == {50} and sub.incarnation == 0
    finally:
        sub.close()
