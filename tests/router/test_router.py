"""kvtier.router: the index folds kvtier's and vLLM's events, resyncs after gaps, scores prefixes;
the router prefers cached prefixes within the load cap."""

from __future__ import annotations

import logging
import time

import pytest

from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, KVEventPublisher
from kvtier.router import CacheAwareRouter, EventSubscriber, KVIndex
from tests.events.helpers import ipc_config, run_traffic, small_store, tier_view


def batch(*events):
    return KVEventBatch(0.0, list(events))


def stored(hashes, medium, block_size=4, tokens=(), parent=None):
    return BlockStored(list(hashes), parent, list(tokens), block_size, None, medium, None)


def test_score_is_the_weighted_longest_prefix():
    index = KVIndex(block_size=4, weights={"GPU": 1.0, "CPU": 0.5, "STORAGE": 0.25})
    index.apply("a", "vllm", batch(stored([1, 2], None)))  # vLLM's own events: medium None is GPU
    index.apply("a", "kvtier", batch(stored([2, 3], "CPU"), stored([4], "STORAGE")))
    assert index.score("a", [1, 2, 3, 4, 5]) == 1.0 + 1.0 + 0.5 + 0.25  # block 2's best medium counts
    assert index.score("a", [9, 1, 2]) == 0.0  # a prefix, not a bag of blocks
    assert index.score("b", [1]) == 0.0
    index.apply("a", "kvtier", batch(BlockRemoved([3], "CPU")))
    assert index.score("a", [1, 2, 3, 4]) == 2.0


def test_all_blocks_cleared_forgets_only_its_own_source():
    index = KVIndex(block_size=4)
    index.apply("a", "vllm", batch(stored([1], "GPU")))
    index.apply("a", "kvtier", batch(stored([1, 2], "CPU")))
    index.apply("a", "vllm", batch(AllBlocksCleared()))
    assert index.blocks("a", "GPU") == set() and index.blocks("a", "CPU") == {1, 2}


def test_events_with_another_hash_setting_are_dropped_counted_and_warned_once(caplog):
    def rehash(parent, tokens):
        return hash((parent, tuple(tokens))) & (2**64 - 1)

    index = KVIndex(block_size=4, rehash=rehash)
    good = rehash(None, [1, 2, 3, 4])
    with caplog.at_level(logging.WARNING, logger="kvtier.router.index"):
        index.apply("a", "s", batch(stored([good], "GPU", tokens=[1, 2, 3, 4])))
        index.apply("b", "s", batch(stored([12345], "GPU", tokens=[1, 2, 3, 4]), stored([777], "GPU", tokens=[5, 6, 7, 8])))
        index.apply("c", "s", batch(stored([5], "CPU", block_size=16)))
    assert index.blocks("a", "GPU") == {good}
    assert index.blocks("b", "GPU") == set() and index.blocks("c", "CPU") == set()
    assert index.stats.foreign_hash == 2 and index.stats.foreign_block_size == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "PYTHONHASHSEED" in warnings[0] and "block_size 16" in warnings[1]


def test_bad_index_and_router_arguments():
    with pytest.raises(ValueError, match="block_size"):
        KVIndex(block_size=0)
    with pytest.raises(ValueError, match="weights"):
        KVIndex(block_size=4, weights={"CPU": -1})
    with pytest.raises(ValueError, match="max_load_share"):
        CacheAwareRouter(KVIndex(4), ["a"], max_load_share=0.5)
    with pytest.raises(ValueError, match="distinct"):
        CacheAwareRouter(KVIndex(4), ["a", "a"])


def test_router_follows_the_cache_within_the_load_cap():
    index = KVIndex(block_size=4)
    index.apply("b", "kvtier", batch(stored([1, 2, 3], "CPU")))
    router = CacheAwareRouter(index, ["a", "b", "c", "d"], max_load_share=1.5)
    picks = [router.pick([1, 2, 3]) for _ in range(400)]
    assert picks[0] == "b"
    assert router.max_load_share() <= 1.5 + 4 / 400  # one request of rounding at most
    assert picks.count("b") == max(picks.count(x) for x in "abcd")


def test_a_cold_prefix_goes_to_its_sticky_instance_within_the_load_cap():
    router = CacheAwareRouter(KVIndex(block_size=4), ["a", "b", "c", "d"], max_load_share=1.5)
    home = router.sticky(42, router.instances)
    assert router.sticky(42, router.instances) == home  # a pure function of the hash and the names
    assert router.pick([42, 1]) == home and router.pick([42, 2]) != home  # 2 > 1.5 * 2 / 4: over the cap
    loose = CacheAwareRouter(KVIndex(block_size=4), ["a", "b", "c", "d"], max_load_share=4.0)
    assert [loose.pick([42, i]) for i in range(4)] == [home] * 4  # within the cap, always the same one
    # different first blocks spread over every instance: the cold prefixes partition the caches
    spread = CacheAwareRouter(KVIndex(block_size=4), ["a", "b", "c", "d"], max_load_share=4.0)
    picks = [spread.pick([h]) for h in range(400)]
    assert all(60 <= picks.count(x) <= 140 for x in "abcd")
    # a cached prefix anywhere still wins over the sticky instance
    index = KVIndex(block_size=4)
    other = next(x for x in "abcd" if x != home)
    index.apply(other, "kvtier", batch(stored([42], "CPU")))
    assert CacheAwareRouter(index, list("abcd")).pick([42, 5]) == other


def _wait_until(sub: EventSubscriber, want: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (sub.last_seq if sub.last_seq is not None else -1) + 1 < want and time.monotonic() < deadline:
        sub.poll(100)


def test_subscriber_rebuilds_kvtiers_tiers_after_a_forced_gap(tmp_path):
    store = small_store(tmp_path)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1))
    index = KVIndex(block_size=store.config.chunk_tokens)
    sub = EventSubscriber(index, "engine-0", pub.endpoint, replay=pub.replay_endpoint)
    try:
        pub.attach_store(store)
        run_traffic(store, prompts=6, seed=3)
        assert pub.flush()
        time.sleep(0.2)
        for _ in range(3):  # lose three live batches before the subscriber sees them
            if sub._sub.poll(1000):
                sub._sub.recv_multipart()
        run_traffic(store, prompts=8, seed=4)
        assert pub.flush()
        _wait_until(sub, pub.stats["batches"])
        assert sub.stats.gaps >= 1 and sub.stats.replayed >= 3 and sub.stats.unrecovered_gaps == 0
        want = tier_view(store)
        assert index.blocks("engine-0", "CPU") == want["CPU"]
        assert index.blocks("engine-0", "STORAGE") == want["STORAGE"]
    finally:
        sub.close()
        pub.close()
        store.close()


def test_a_gap_the_replay_buffer_no_longer_covers_clears_the_view(tmp_path):
    pub = KVEventPublisher(ipc_config(tmp_path, buffer_steps=2, batch_max_events=1))
    index = KVIndex(block_size=4)
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.2)
        pub._put(stored([1], "CPU"))
        assert pub.flush()
        _wait_until(sub, 1)
        assert index.blocks("e", "CPU") == {1}
        for _ in range(5):
            pub._put(stored([2], "CPU"))
        assert pub.flush()
        time.sleep(0.2)
        while sub._sub.poll(200):  # all five lost live; the buffer keeps only the last two
            sub._sub.recv_multipart()
        pub._put(stored([3], "CPU"))
        assert pub.flush()
        _wait_until(sub, 7)
        assert sub.stats.unrecovered_gaps == 1
        assert index.blocks("e", "CPU") == {2, 3}  # block 1 was forgotten with the lost view
    finally:
        sub.close()
        pub.close()


def test_garbage_on_the_event_stream_is_counted_not_raised(tmp_path):
    import zmq

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{tmp_path}/raw")
    index = KVIndex(block_size=4)
    sub = EventSubscriber(index, "e", f"ipc://{tmp_path}/raw")
    try:
        time.sleep(0.2)
        pub.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1 not msgpack"])
        pub.send_multipart([b"just one frame"])
        deadline = time.monotonic() + 5
        while sub.stats.bad_messages < 2 and time.monotonic() < deadline:
            sub.poll(100)
        assert sub.stats.bad_messages == 2 and index.instances == []
    finally:
        sub.close()
        pub.close(linger=0)


def test_subscriber_reads_vllms_own_publisher(tmp_path):
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub = kv_events.ZmqEventPublisher(0, endpoint=f"ipc://{tmp_path}/vllm", replay_endpoint=f"ipc://{tmp_path}/vllm-replay")
    index = KVIndex(block_size=16)
    sub = EventSubscriber(index, "vllm-0", f"ipc://{tmp_path}/vllm", replay=f"ipc://{tmp_path}/vllm-replay")
    try:
        time.sleep(0.2)
        for i in range(3):
            pub.publish(kv_events.KVEventBatch(time.time(), [
                kv_events.BlockStored([10 * i, 10 * i + 1], None, [], 16, None, kv_events.MEDIUM_GPU, None)]))
        pub.publish(kv_events.KVEventBatch(time.time(), [kv_events.BlockRemoved([0], kv_events.MEDIUM_GPU)]))
        _wait_until(sub, 4)
        assert index.blocks("vllm-0", "GPU") == {1, 10, 11, 20, 21}
        assert index.score("vllm-0", [10, 11, 99]) == 2.0
    finally:
        sub.close()
        pub.shutdown()


def test_ties_go_to_the_instance_that_churns_least():
    index = KVIndex(block_size=4)
    index.apply("a", "k", batch(stored([1, 2, 3, 4, 5], "CPU")))
    index.apply("b", "k", batch(stored([1], "CPU")))
    index.apply("c", "k", batch(stored([1, 9], "CPU")))
    assert [index.churn(x) for x in "abc"] == [5, 1, 2]
    router = CacheAwareRouter(index, ["a", "b", "c"])
    assert router.pick([1, 7]) == "b"  # all hold block 1: the least written-to wins
    assert router.pick([1, 2]) == "a"  # a longer prefix beats churn


def test_prompt_hashes_follow_what_events_named_parent_by_parent():
    index = KVIndex(block_size=2)
    index.apply("a", "vllm", batch(BlockStored([11, 12], None, [1, 2, 3, 4], 2, None, "GPU", None)))
    index.apply("b", "vllm", batch(BlockStored([13], 12, [5, 6], 2, None, "GPU", None)))
    assert index.prompt_hashes([1, 2, 3, 4, 5, 6, 7]) == [11, 12, 13]  # across instances, partial block ignored
    assert index.prompt_hashes([1, 2, 9, 9, 5, 6]) == [11]  # a block nobody named ends it
    assert index.prompt_hashes([3, 4]) == []  # the same tokens under another parent are another block
    index.apply("c", "kvtier", batch(BlockStored([99], None, [], 2, None, "CPU", None)))  # no token_ids: nothing learnt
    assert index.prompt_hashes([1, 2]) == [11]


def _drain(sub: EventSubscriber, want, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sub.poll(100)
        if want():
            return True
    return False


def test_a_restarted_publisher_is_followed_from_its_batch_0(tmp_path):
    """Bug: a restarted publisher numbers its batches from 0 again; the subscriber counted them as
    duplicates and kept the old view (DRAM the restart emptied) until the numbers passed the old ones."""
    index = KVIndex(block_size=4)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1))
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.2)
        for h in range(1, 6):
            pub._put(stored([h], "CPU"))
        assert pub.flush()
        assert _drain(sub, lambda: sub.last_seq == 4)
        pub.close()
        pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1))  # the service restarts
        time.sleep(0.5)
        sub.poll(100)
        pub._put(stored([100], "CPU"))
        pub._put(stored([101], "CPU"))
        assert pub.flush()
        assert _drain(sub, lambda: index.blocks("e", "CPU") == {100, 101})
        assert sub.stats.restarts == 1
    finally:
        sub.close()
        pub.close()


def test_a_replay_cut_short_or_events_dropped_on_a_full_queue_clear_the_view(tmp_path):
    """Bugs: a replay past the ROUTER's high-water mark lost batches silently and later replayed
    batches were applied without a gap check; events dropped on a full publisher queue left no
    gap at all. Either way removed blocks stayed in the index with no loss counted."""
    index = KVIndex(block_size=4)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1, max_queue_size=4))
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.2)
        for h in range(100):
            pub._put(stored([h], "CPU"))
            assert pub.flush()
        assert _drain(sub, lambda: sub.last_seq == 99)
        for h in range(100):  # faster than the thread sends: some are dropped
            pub._put(BlockRemoved([h], "CPU"))
        assert pub.flush()
        assert pub.stats["dropped_queue_full"] > 0
        _drain(sub, lambda: False, timeout_s=2.0)
        held = index.blocks("e", "CPU")
        assert held == set() or sub.stats.unrecovered_gaps > 0, (len(held), sub.stats)
        assert not held - {h for h in range(100)}  # nothing it never stored
    finally:
        sub.close()
        pub.close()


def test_a_long_replay_arrives_whole(tmp_path):
    n = 3000  # past the replay socket's default high-water mark of 1000
    index = KVIndex(block_size=4)
    pub = KVEventPublisher(ipc_config(tmp_path, batch_max_events=1, buffer_steps=5000))
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.2)
        pub._put(stored([0], "CPU"))
        assert pub.flush()
        assert _drain(sub, lambda: sub.last_seq == 0)
        for h in range(1, n):
            pub._put(stored([h], "CPU"))
        assert pub.flush(30)
        time.sleep(0.3)
        while sub._sub.poll(200):  # lost live
            sub._sub.recv_multipart()
        pub._put(stored([n], "CPU"))
        assert pub.flush()
        assert _drain(sub, lambda: sub.last_seq == n, timeout_s=20)
        assert index.blocks("e", "CPU") == set(range(n + 1)) and sub.stats.unrecovered_gaps == 0
    finally:
        sub.close()
        pub.close()


def test_a_prefix_in_use_stays_named_when_the_name_table_fills() -> None:
    """Bug: a full name table was cleared at once, and vLLM names a block only when it caches it: a
    hot prefix it kept cached became unroutable for good. Names now go least recently used first,
    and a prompt asking for a name uses it."""
    index = KVIndex(block_size=2)
    index.max_named = 100
    index.apply("b", "vllm", batch(BlockStored([7001, 7002], None, [1, 2, 3, 4], 2, None, "GPU", None)))
    hot = [1, 2, 3, 4, 50, 51]
    for i in range(300):  # other traffic names 300 blocks; the hot prompt comes back now and then
        index.apply("a", "vllm", batch(BlockStored([i], None, [10_000 + 2 * i, 10_001 + 2 * i], 2, None, "GPU", None)))
        if i % 50 == 0:
            assert index.prompt_hashes(hot) == [7001, 7002]
    assert index.prompt_hashes(hot) == [7001, 7002]
    assert len(index._named) == 100  # noqa: SLF001 - still bounded
    assert index.prompt_hashes([10_000, 10_001]) == []  # the oldest unused names went


def test_a_source_that_never_removes_stays_bounded_oldest_first() -> None:
    """The vLLM connector's CPU blocks reach vLLM's stream as stores only (their evictions are in
    the service's stream): a router fed by vLLM's stream alone grew its index without bound."""
    index = KVIndex(block_size=4)
    index.max_blocks = 50
    for h in range(200):
        index.apply("a", "vllm", batch(stored([h], "CPU")))
        if h == 170:
            index.apply("a", "vllm", batch(stored([121], "CPU")))  # stored again while held: the newest now
    assert index.blocks("a", "CPU") == set(range(151, 200)) | {121}
    index.apply("a", "vllm", batch(BlockRemoved([199], "CPU")))
    assert 199 not in index.blocks("a", "CPU") and len(index.blocks("a", "CPU")) == 49
