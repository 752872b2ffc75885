"""Prefill/decode handoffs between a producer's and a consumer's scheduler side (pd.py), no engine.

Two Sims share one in-process store: the producer (load off) computes and saves, the consumer
(save off) gets the producer's kv_transfer_params on the same prompt and loads.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from kvtier.client.api import InProcessClient
from kvtier.connectors.vllm.pd import PARAMS_KEY, Handoff, HandoffError, Identity, refusal_in
from kvtier.core.config import DiskTierConfig, LowerTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.errors import TierUnavailableError
from kvtier.store.tiered import SaveResult, TieredStore
from kvtier.store.transfer import TransferHandle

from .sim import BLOCK, LAYOUT, FakeRequest, Sim, make_client

IDENT = Identity("test-model", LAYOUT.layout_id(BLOCK).hex(), "format=test", BLOCK, "sha256")
PROMPT14 = list(range(200, 214))  # 3 whole chunks of 4 + a partial chunk of 2
ASK = {"do_remote_decode": True}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pair(wait_s: float = 5.0) -> tuple[Sim, Sim, Clock]:
    client = make_client()
    producer, consumer = Sim(client), Sim(client)
    clock = Clock()
    producer.sched.load, producer.sched.identity = False, IDENT
    consumer.sched.save, consumer.sched.identity = False, IDENT
    consumer.sched.remote_wait_s, consumer.sched.clock = wait_s, clock
    return producer, consumer, clock


def prefill(producer: Sim, prompt: list[int], req_id: str = "p") -> dict:
    req = FakeRequest(req_id, prompt)
    req.kv_transfer_params = dict(ASK)  # type: ignore[attr-defined]
    producer.admit(req)
    producer.step({req: len(prompt)})
    params = producer.sched.request_finished(req)
    assert params is not None
    return params


def decode_request(prompt: list[int], params: dict | None, req_id: str = "d") -> FakeRequest:
    req = FakeRequest(req_id, prompt)
    req.kv_transfer_params = params  # type: ignore[attr-defined]
    return req


def test_producer_hands_over_what_it_published_and_consumer_loads_all_but_the_last_token() -> None:
    producer, consumer, _ = pair()
    params = prefill(producer, PROMPT14)
    chain = producer.sched.reqs.get("p")
    assert chain is None  # finished
    handoff = Handoff.from_params(params)
    assert handoff is not None and (handoff.chunks, handoff.partial_tokens) == (3, 2)
    assert handoff.identity == IDENT
    d = decode_request(PROMPT14, params)
    assert consumer.admit(d) == 13  # every prompt token but the last: the decode side computes 1 token
    consumer.step({d: 1})
    assert consumer.tokens_are_right(d, 0, 14) and not consumer.failed
    assert not consumer.plans[-1].saves  # a consumer saves nothing
    assert consumer.sched.stats["handoffs_received"] == 1 and consumer.sched.stats["handoff_wait_polls"] == 0
    assert handoff.last_key == consumer.sched.reqs["d"].chain.partial_key().hex()


def test_producer_returns_params_only_when_asked() -> None:
    producer, _, _ = pair()
    req = FakeRequest("p", PROMPT14)
    producer.admit(req)
    producer.step({req: 14})
    assert producer.sched.request_finished(req) is None


def test_consumer_waits_until_the_store_shows_the_chunks_then_loads() -> None:
    producer, consumer, clock = pair(wait_s=5.0)
    params = prefill(_params_elsewhere(), PROMPT14)  # made on another store: the shared one is still empty
    d = decode_request(PROMPT14, params)
    assert consumer.sched.num_new_matched_tokens(d, 0) is None  # not there yet: vLLM asks again later
    assert consumer.sched.num_new_matched_tokens(d, 0) is None  # within the poll interval: no store lookup
    assert consumer.sched.stats["lookups"] == 1
    assert consumer.leases() == 0  # a waiting request holds no lease
    clock.now += 1.0
    prefill(producer, PROMPT14)  # the chunks arrive
    assert consumer.admit(d) == 13
    consumer.step({d: 1})
    assert consumer.tokens_are_right(d, 0, 14) and not consumer.failed
    assert consumer.sched.stats["handoff_timeouts"] == 0


def _params_elsewhere() -> Sim:
    other = Sim(make_client())
    other.sched.load, other.sched.identity = False, IDENT
    return other


def test_chunks_that_never_appear_are_computed_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    _, consumer, clock = pair(wait_s=2.0)
    params = prefill(_params_elsewhere(), PROMPT14)  # published in another store: this one never sees them
    d = decode_request(PROMPT14, params)
    assert consumer.sched.num_new_matched_tokens(d, 0) is None
    clock.now += 1.0
    assert consumer.sched.num_new_matched_tokens(d, 0) is None
    clock.now += 1.5  # past the bound
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert consumer.admit(d) == 0  # computed here, no hang
    assert "0 of the 4 chunks its producer published" in caplog.text
    assert consumer.sched.stats["handoff_timeouts"] == 1
    consumer.step({d: 14})
    assert consumer.tokens_are_right(d, 0, 14)


def test_chunks_partly_there_after_the_bound_load_what_is_there() -> None:
    producer, consumer, clock = pair(wait_s=1.0)
    params = prefill(_params_elsewhere(), PROMPT14)
    prefill(producer, PROMPT14[:8])  # only the first 2 chunks reach the shared store
    d = decode_request(PROMPT14, params)
    assert consumer.sched.num_new_matched_tokens(d, 0) is None
    clock.now += 2.0
    assert consumer.admit(d) == 8
    consumer.step({d: 6})
    assert consumer.tokens_are_right(d, 0, 14) and not consumer.failed


@pytest.mark.parametrize("field,value,named", [
    ("model", "other-model", "model 'other-model' (producer) != 'test-model'"),
    ("layout", "other-layout", "layout"),
    ("chunk_tokens", 8, "chunk_tokens '8'"),
    ("hash_mode", "xxh3", "hash_mode"),
])
def test_handoff_of_another_model_or_layout_is_refused_without_waiting(
        field: str, value: object, named: str, caplog: pytest.LogCaptureFixture) -> None:
    producer, consumer, _ = pair()
    params = prefill(producer, PROMPT14)
    params[PARAMS_KEY][field] = value
    d = decode_request(PROMPT14, params)
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        ext = consumer.sched.num_new_matched_tokens(d, 0)
    assert ext == 13  # its own keys still hit what the store holds: right KV whatever the params say
    assert "kv_transfer_params refused" in caplog.text and named in caplog.text
    assert [r.levelno for r in caplog.records if "refused" in r.getMessage()] == [logging.ERROR]
    assert consumer.sched.stats["handoffs_rejected"] == 1
    # the request's output kv_transfer_params report it, for the proxy to answer with an error
    report = consumer.sched.request_finished(d)
    assert refusal_in(report) is not None and refusal_in(report)[0] == "identity"  # type: ignore[index]
    assert named in refusal_in(report)[1]  # type: ignore[index]


def test_handoff_of_another_prompt_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    producer, consumer, _ = pair()
    params = prefill(producer, PROMPT14)
    other = PROMPT14[:-1] + [999]  # same length, another last token: another partial chunk key
    d = decode_request(other, params)
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert consumer.sched.num_new_matched_tokens(d, 0) == 12  # the shared whole chunks only
    assert "made for another prompt" in caplog.text
    longer = decode_request(PROMPT14 + [5, 6, 7], params, "d2")  # the handoff names a partial chunk it lacks
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        consumer.sched.num_new_matched_tokens(longer, 0)
    assert consumer.sched.stats["handoffs_rejected"] == 2
    assert [refusal_in(consumer.sched.request_finished(r)) for r in (d, longer)] == [
        ("prompt", "it was made for another prompt (14 tokens; this one has 14 and differs)"),
        ("prompt", "it was made for another prompt (14 tokens; this one has 17)")]
    # a handoff without the prompt fields (the previous format) is still checked by its chunks' keys
    for key in ("prompt_tokens", "prompt_digest"):
        del params[PARAMS_KEY][key]
    old = decode_request(other, params, "d3")
    consumer.sched.num_new_matched_tokens(old, 0)
    assert refusal_in(consumer.sched.request_finished(old)) == (
        "prompt", "its last_key is not this prompt's key (another prompt, cache salt or adapter)")


def test_malformed_handoff_is_reported_back_and_an_accepted_one_is_not() -> None:
    producer, consumer, _ = pair()
    params = prefill(producer, PROMPT14)
    bad = decode_request(PROMPT14, {PARAMS_KEY: {"v": 9}}, "bad")
    good = decode_request(PROMPT14, params, "good")
    assert consumer.admit(bad) == 13 and consumer.admit(good) == 13  # the store's hits under its own keys
    assert refusal_in(consumer.sched.request_finished(bad)) == (
        "malformed", "kv_transfer_params['kvtier'].v: expected 1, got 9")
    assert consumer.sched.request_finished(good) is None


@pytest.mark.parametrize("raw,named", [
    ("x", "expected an object"),
    ({"v": 2}, ".v: expected 1"),
    ({**Handoff(IDENT, 1, 0, "ab").to_params()[PARAMS_KEY], "chunks": -1}, ".chunks: expected an integer"),
    ({**Handoff(IDENT, 1, 0, "ab").to_params()[PARAMS_KEY], "last_key": "zz"}, ".last_key: expected a hex"),
    ({**Handoff(IDENT, 1, 0, "ab").to_params()[PARAMS_KEY], "model": 3}, ".model: expected a string"),
    ({**Handoff(IDENT, 0, 0, "ab").to_params()[PARAMS_KEY]}, "last_key must be set exactly"),
])
def test_malformed_params_name_the_field(raw: object, named: str) -> None:
    with pytest.raises(HandoffError, match=named.replace(".", r"\.").replace("(", r"\(")):
        Handoff.from_params({PARAMS_KEY: raw})
    assert Handoff.from_params({"other": 1}) is None


def test_handoff_round_trips() -> None:
    h = Handoff(IDENT, 3, 2, "00ff")
    assert Handoff.from_params(h.to_params()) == h


def test_aborted_waiting_request_leaves_no_state() -> None:
    _, consumer, _ = pair()
    params = prefill(_params_elsewhere(), PROMPT14)
    d = decode_request(PROMPT14, params)
    assert consumer.sched.num_new_matched_tokens(d, 0) is None
    consumer.sched.request_finished(d)
    assert "d" not in consumer.sched.reqs and consumer.leases() == 0


# -- the producer answers once its chunks are in the shared tier (publish_wait_s) -------------------
def host_store(shared: Path, read_only: bool = False) -> TieredStore:
    """One host's store: its own DRAM over the shared folder (a lower tier), as two hosts mounting one."""
    folder = DiskTierConfig(root=str(shared), capacity_bytes=1 << 30, read_only=read_only)
    cfg = StoreConfig(chunk_tokens=BLOCK, memory=MemoryTierConfig(capacity_bytes=64 * LAYOUT.chunk_bytes(BLOCK)),
                      lower_tiers=(LowerTierConfig(name="shared", disk=folder),))
    return TieredStore(cfg, LAYOUT)


class HeldWrites:
    """The shared tier's writes held until `release` is set; `asked` is set (and the keys recorded)
    when the producer asks the store to wait for them."""

    def __init__(self, store: TieredStore) -> None:
        self.release, self.asked = threading.Event(), threading.Event()
        self.keys: list[bytes] = []
        shared = store.lower_tiers[0]
        write, wait_lower = shared.write, store.wait_lower

        def held_write(meta, layers):  # type: ignore[no-untyped-def]
            assert self.release.wait(30), "the test never released the writes"
            return write(meta, layers)

        def asking(keys, timeout_s):  # type: ignore[no-untyped-def]
            self.keys = list(keys)
            self.asked.set()
            return wait_lower(keys, timeout_s)

        shared.write = held_write  # type: ignore[method-assign]
        store.wait_lower = asking  # type: ignore[method-assign]


class _CommitToDram:
    """A save session that answers its commit once the chunks are in DRAM, as the host service does
    (the in-process store's commit handle is its lower-tier write's)."""

    def __init__(self, batch) -> None:  # type: ignore[no-untyped-def]
        self.batch = batch

    def write_layer(self, layer, srcs) -> None:  # type: ignore[no-untyped-def]
        self.batch.write_layer(layer, srcs)

    def abort(self) -> None:
        self.batch.abort()

    def commit(self, extras=None) -> TransferHandle[SaveResult]:  # type: ignore[no-untyped-def]
        n = len(self.batch.keys)
        self.batch.commit(extras)  # published in DRAM now; the lower tiers are written in the background
        done: Future[SaveResult] = Future()
        done.set_result(SaveResult(n, n, 0))
        return TransferHandle(0, "save", done)


class ServiceLikeClient(InProcessClient):
    def begin_save(self, keys, parent, first_depth):  # type: ignore[no-untyped-def]
        return _CommitToDram(super().begin_save(keys, parent, first_depth))


def producer_on(store: TieredStore, publish_wait_s: float = 10.0) -> Sim:
    producer = Sim(ServiceLikeClient(store))
    producer.sched.load, producer.sched.identity = False, IDENT
    producer.sched.publish_wait_s = publish_wait_s
    return producer


def test_producer_answers_only_once_the_shared_tier_holds_its_chunks(tmp_path: Path) -> None:
    store = host_store(tmp_path / "shared")
    held = HeldWrites(store)
    producer = producer_on(store)
    # released only once the producer waits: answering earlier would find the folder empty
    releaser = threading.Thread(target=lambda: held.asked.wait(30) and held.release.set())
    releaser.start()
    params = prefill(producer, PROMPT14)
    releaser.join()
    handoff = Handoff.from_params(params)
    assert handoff is not None and (handoff.chunks, handoff.partial_tokens) == (3, 2)
    assert len(held.keys) == 4 and held.keys[-1].hex() == handoff.last_key  # 3 chunks + the partial one
    assert store.lower_tiers[0].lookup(held.keys) == 4  # in the shared folder when the answer goes out
    stats = producer.sched.stats
    assert (stats["handoff_publish_waits"], stats["handoff_publish_timeouts"]) == (1, 0)
    # the decode instance, another host over the same folder, finds them at its first lookup
    consumer = Sim(InProcessClient(host_store(tmp_path / "shared", read_only=True)))
    consumer.sched.save, consumer.sched.identity = False, IDENT
    d = decode_request(PROMPT14, params)
    assert consumer.admit(d) == 13
    consumer.step({d: 1})
    assert consumer.tokens_are_right(d, 0, 14) and not consumer.failed
    assert consumer.sched.stats["handoff_wait_polls"] == 0
    store.close()


def test_producer_answers_after_its_bound_when_the_writes_lag(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    store = host_store(tmp_path / "shared")
    held = HeldWrites(store)
    producer = producer_on(store, publish_wait_s=0.01)
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        params = prefill(producer, PROMPT14)  # answered: the consumer's own bounded wait takes it from here
    assert Handoff.from_params(params) is not None
    assert "4 chunks of its handoff are still being written" in caplog.text
    assert producer.sched.stats["handoff_publish_timeouts"] == 1
    held.release.set()
    store.close()


def test_producer_with_publish_wait_0_does_not_wait(tmp_path: Path) -> None:
    store = host_store(tmp_path / "shared")
    held = HeldWrites(store)
    producer = producer_on(store, publish_wait_s=0.0)
    assert Handoff.from_params(prefill(producer, PROMPT14)) is not None
    assert not held.asked.is_set() and producer.sched.stats["handoff_publish_waits"] == 0
    held.release.set()
    store.close()


def test_producer_answers_when_the_store_fails_during_the_wait() -> None:
    producer, _, _ = pair()

    def down(keys, timeout_s):  # type: ignore[no-untyped-def]
        raise TierUnavailableError("the service went away")

    producer.client.wait_lower = down  # type: ignore[method-assign]
    params = prefill(producer, PROMPT14)
    assert Handoff.from_params(params) is not None  # the handoff still goes out: the consumer's wait bounds the rest
    assert producer.sched.stats["store_errors"] == 1


def _lose_the_store(producer: Sim) -> None:
    producer.client.flush()
    for key in producer.client.store.memory.keys():
        assert producer.client.store.memory.delete(key)


def _producer_whose_store_lost_the_prompt(lose_again: bool = False) -> tuple[Sim, FakeRequest]:
    """A producer that saved PROMPT14, then lost it from its store (evicted, or the service
    restarted) while vLLM's own prefix cache kept the blocks: the next request hits vLLM's cache.
    `lose_again`: the store loses the chunks once more after that request saved them again."""
    producer = Sim(make_client())
    producer.sched.load, producer.sched.identity = False, IDENT
    a = FakeRequest("a", PROMPT14)
    producer.admit(a)
    producer.step({a: 14})
    producer.finish(a)
    _lose_the_store(producer)
    b = FakeRequest("b", PROMPT14)
    b.kv_transfer_params = dict(ASK)  # type: ignore[attr-defined]
    producer.admit(b, local_hit_tokens=12)  # vLLM's own hit: 3 blocks
    producer.step({b: 2})
    if lose_again:
        _lose_the_store(producer)
    return producer, b


def test_a_producer_saves_again_what_its_store_lost_of_vllms_own_hit() -> None:
    """Bug: chunks vLLM had cached counted as stored, so the ones the store had lost were never
    saved again, and the handoff named none of them: the decode instance computed the prompt."""
    producer, b = _producer_whose_store_lost_the_prompt()
    params = producer.sched.request_finished(b)
    handoff = Handoff.from_params(params)
    assert handoff is not None and handoff.chunks == 3  # the 3 whole chunks, saved again (and the partial one)
    assert producer.sched.stats["handoff_chunks_missing"] == 0
    consumer = Sim(producer.client)
    consumer.sched.save, consumer.sched.identity, consumer.sched.clock = False, IDENT, Clock()
    assert consumer.sched.num_new_matched_tokens(decode_request(PROMPT14, params), 0) == 13


def test_a_handoff_names_only_chunks_the_store_holds() -> None:
    """Bug: the handoff counted vLLM's own prefix hit (and saves only planned) as published; a
    consumer told of chunks nobody held waited its whole remote_wait_s, then computed the prompt."""
    producer, b = _producer_whose_store_lost_the_prompt(lose_again=True)
    params = producer.sched.request_finished(b)
    handoff = Handoff.from_params(params)
    assert handoff is not None and handoff.chunks == 0 and handoff.last_key == ""
    assert producer.sched.stats["handoff_chunks_missing"] == 4  # 3 whole chunks and the partial one
    consumer = Sim(producer.client)
    consumer.sched.save, consumer.sched.identity, consumer.sched.clock = False, IDENT, Clock()
    assert consumer.sched.num_new_matched_tokens(decode_request(PROMPT14, params), 0) == 0  # no wait


def test_an_aborted_producer_request_hands_off_nothing_and_waits_for_nothing() -> None:
    from types import SimpleNamespace

    producer, consumer, _ = pair()
    r = FakeRequest("p", PROMPT14)
    r.kv_transfer_params = dict(ASK)  # type: ignore[attr-defined]
    producer.admit(r)
    producer.step({r: 14})
    r.status = SimpleNamespace(name="FINISHED_ABORTED")  # type: ignore[attr-defined]
    waits = producer.sched.stats["handoff_publish_waits"]
    assert producer.sched.request_finished(r) is None
    assert producer.sched.stats["handoff_publish_waits"] == waits


@pytest.mark.parametrize(("producer_prompt", "consumer_prompt"), [
    (PROMPT14[:8], PROMPT14),  # a shorter prompt whose whole chunks this one extends
    (PROMPT14[:9], PROMPT14[:8] + [999]),  # same length, another last token (a 1-token tail: no partial chunk)
])
def test_a_handoff_made_for_another_prompt_sharing_its_chunks_is_refused(producer_prompt, consumer_prompt) -> None:
    """Bug: only the published chunks' keys were compared, so a handoff for a prompt the consumer's
    merely extends (or that differs after its last whole chunk) was accepted, with no warning."""
    producer, consumer, _ = pair()
    params = prefill(producer, producer_prompt)
    d = decode_request(consumer_prompt, params)
    consumer.sched.num_new_matched_tokens(d, 0)
    assert consumer.sched.stats["handoffs_rejected"] == 1
    assert refusal_in(consumer.sched.request_finished(d))[0] == "prompt"


def test_a_handoff_without_the_prompt_fields_is_still_read() -> None:
    """A producer of the previous format (no prompt_tokens / prompt_digest) is still understood."""
    producer, consumer, _ = pair()
    params = prefill(producer, PROMPT14)
    for key in ("prompt_tokens", "prompt_digest"):
        del params[PARAMS_KEY][key]
    assert Handoff.from_params(params).prompt_tokens == -1
    d = decode_request(PROMPT14, params)
    assert consumer.sched.num_new_matched_tokens(d, 0) == 13
