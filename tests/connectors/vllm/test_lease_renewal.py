"""Leases of planned loads ("vLLM: load pins are not renewed"): the scheduler leases a lookup's hits
and the worker loads them in the step the plan ships in, which may start long after the lookup
(async scheduling behind a long step, pipeline parallelism). With fake requests, the CPU worker,
an in-process store and a fake clock; the renewing thread with real time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from kvtier.connectors.vllm.leases import LeaseKeeper
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import StepPlan
from kvtier.core.errors import TierUnavailableError
from kvtier.service.protocol import ServiceError

from .sim import LAYERS, FakeRequest, Sim, make_client

PROMPT = list(range(100, 109))  # 9 tokens: 2 whole chunks of 4 + 1
LEASE_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def small_sim(clock: Clock, capacity_chunks: int = 4) -> Sim:
    """A store of `capacity_chunks` chunks holding PROMPT's 2 chunks, leases of LEASE_S on `clock`."""
    sim = Sim(make_client(capacity_chunks, LEASE_S, clock), clock=clock)
    a = FakeRequest("a", PROMPT)
    sim.admit(a)
    sim.step({a: 9})
    sim.finish(a)
    return sim


def plan_load(sim: Sim, req: FakeRequest) -> StepPlan:
    """Admit `req` (a store hit) and build the step that loads it; the worker runs it later
    (run_late), as with async scheduling behind a long step."""
    assert sim.admit(req) == 8
    plan = sim.sched.build_plan({req.request_id: 1}, sim.block_ids_of)
    assert [ld.req_id for ld in plan.loads] == [req.request_id]
    return plan


def run_late(sim: Sim, plan: StepPlan, req: FakeRequest) -> None:
    """The worker runs `plan` (which computes req's token 8) now."""
    sim.run_worker(plan, {req: 1})
    req.num_computed_tokens = 9


def is_zero(sim: Sim, block: int) -> bool:
    return all(bool((sim.kv[name][block] == 0).all()) for name in LAYERS)


def count_renewals(sim: Sim) -> list[list[int]]:
    """The lease ids of each client.renew call from now on."""
    calls: list[list[int]] = []
    real = sim.client.renew

    def renew(lease_ids: Sequence[int]) -> list[int]:
        calls.append(list(lease_ids))
        return real(lease_ids)

    sim.client.renew = renew  # type: ignore[method-assign]
    return calls


def test_an_expired_lease_is_a_clean_recompute_never_the_kv_that_reused_its_slots() -> None:
    """What a lease lost before its load costs (no scheduler step to renew it; the behaviour of
    every long wait before the fix): saves evict its chunks and reuse their slots, and the load,
    which reads by key, misses them. Its blocks are reported and zeroed (never the new chunks'
    KV), vLLM recomputes them, and the result is right: safe, but slow."""
    clock = Clock()
    sim = small_sim(clock)
    mem = sim.client.store.memory
    b = FakeRequest("b", PROMPT)
    plan_b = plan_load(sim, b)
    a_keys = sim.sched.reqs["b"].chain.keys[:2]
    a_slots = {mem.slot_of(k) for k in a_keys}
    clock.now += LEASE_S + 2  # one step longer than the lease, and nothing renewed it
    c = FakeRequest("c", list(range(500, 517)))  # 4 whole chunks: the store's every slot
    assert sim.admit(c) == 0
    assert sim.leases() == 0  # b's lease expired
    sim.step({c: 17})
    c_slots = {mem.slot_of(k) for k in sim.sched.reqs["c"].chain.keys}
    assert a_slots <= c_slots and all(mem.slot_of(k) is None for k in a_keys)  # reused by c's chunks
    run_late(sim, plan_b, b)
    blocks = sim.blocks["b"][:2]
    assert sim.failed == set(blocks)  # a miss, reported
    assert all(is_zero(sim, blk) for blk in blocks)  # zeroed: not c's KV from the reused slots
    sim.sched.load_errors(sim.failed)
    sim.failed = set()
    b.num_computed_tokens = 0  # vLLM rolls back to the failed block and recomputes
    sim.step({b: 9})
    assert sim.tokens_are_right(b, 0, 9)


def test_a_planned_loads_lease_is_renewed_until_the_worker_loads_it() -> None:
    """Bug: the lease of a planned load lasted lease_s from its lookup, however long the load
    waited for the worker. Past it, the chunks were unpinned, other requests' saves evicted them,
    and the load failed: the request recomputed its hit, and the step's saves were dropped."""
    clock = Clock()
    sim = small_sim(clock)
    b = FakeRequest("b", PROMPT)
    plan_b = plan_load(sim, b)
    clock.now += 6
    c = FakeRequest("c", list(range(500, 509)))
    assert sim.admit(c) == 0
    sim.step({c: 9})  # the scheduler's next step renews b's lease (past half of it)
    clock.now += 6  # 12 s after b's lookup: past the lease it took
    d = FakeRequest("d", list(range(700, 709)))
    assert sim.admit(d) == 0  # (its lookup reaps expired leases)
    sim.step({d: 9})  # d's saves want slots: only unleased chunks may go
    assert sim.leases() == 1
    run_late(sim, plan_b, b)
    assert not sim.failed
    assert sim.block_is_right(b, 0) and sim.block_is_right(b, 1)
    assert sim.leases() == 0  # the worker released it
    clock.now += 6
    sim.step({b: 0})
    assert sim.sched.leases.held() == []  # the store no longer holds it: forgotten
    assert sim.sched.leases.stats["leases_renewed"] == 2


def test_renewals_are_one_call_per_step_and_only_for_leases_past_half_their_lease() -> None:
    clock = Clock()
    sim = small_sim(clock, capacity_chunks=16)
    calls = count_renewals(sim)
    reqs = [FakeRequest(f"b{i}", PROMPT) for i in range(3)]
    for r in reqs:
        assert sim.admit(r) == 8
    sim.sched.build_plan({r.request_id: 1 for r in reqs}, sim.block_ids_of)  # three loads, not made yet
    clock.now += 4
    sim.sched.build_plan({}, sim.block_ids_of)
    assert calls == []  # a load made within half a lease costs no call
    clock.now += 1
    sim.sched.build_plan({}, sim.block_ids_of)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(sim.sched.leases.held()) and len(calls[0]) == 3
    clock.now += 1
    sim.sched.build_plan({}, sim.block_ids_of)
    assert len(calls) == 1  # renewed a step ago


def test_a_finished_requests_lease_is_no_longer_renewed() -> None:
    clock = Clock()
    sim = small_sim(clock)
    calls = count_renewals(sim)
    b = FakeRequest("b", PROMPT)
    plan_load(sim, b)
    sim.finish(b)  # aborted before its step ran
    clock.now += 6
    sim.sched.build_plan({}, sim.block_ids_of)
    assert calls == [] and sim.sched.leases.held() == []


def test_a_lease_is_kept_at_most_max_hold_s_then_its_load_recomputes() -> None:
    """A worker that never makes its load must not pin the store's DRAM for good."""
    clock = Clock()
    sim = small_sim(clock)
    sim.sched.leases.max_hold_s = 3 * LEASE_S
    b = FakeRequest("b", PROMPT)
    plan_b = plan_load(sim, b)
    for _ in range(5):
        clock.now += 6
        sim.sched.build_plan({}, sim.block_ids_of)
    assert sim.leases() == 1  # 30 s on: renewed
    clock.now += 6
    sim.sched.build_plan({}, sim.block_ids_of)
    assert sim.sched.leases.held() == [] and sim.sched.leases.stats["leases_given_up"] == 1
    clock.now += LEASE_S
    sim.client.lookup([])  # (an in-process store reaps leases at lookups)
    assert sim.leases() == 0
    assert sim.client.store.memory.delete(sim.sched.reqs["b"].chain.keys[1])  # evicted meanwhile
    run_late(sim, plan_b, b)
    assert sim.failed == {sim.blocks["b"][1]} and is_zero(sim, sim.blocks["b"][1])


def fake_link(renew) -> StoreLink:  # noqa: ANN001 - a client with only renew
    return StoreLink(lambda first: SimpleNamespace(renew=renew, close=lambda: None), retry_after_s=0.0)  # type: ignore[arg-type, return-value]


def test_a_failed_renewal_keeps_the_leases_for_the_next_step(caplog) -> None:
    clock = Clock()
    answers: list[object] = [TierUnavailableError("gone"), ServiceError("invalid", "no"), None]

    def renew(ids: Sequence[int]) -> list[int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return list(ids)

    keeper = LeaseKeeper(fake_link(renew), LEASE_S, clock)
    keeper.hold("b", 7, clock())
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.vllm"):
        assert keeper.renew_due() == 0
        assert keeper.renew_due() == 0
    assert caplog.text.count("renewing the leases of planned loads failed") == 1  # warned once
    assert keeper.held() == [7] and keeper.stats["lease_renew_errors"] == 2
    assert keeper.renew_due() == 1


def test_a_service_that_cannot_renew_is_warned_of_once(caplog) -> None:
    clock = Clock()

    def renew(ids: Sequence[int]) -> list[int]:
        raise ServiceError("unknown_op", "unknown message type 'renew_leases'")

    keeper = LeaseKeeper(fake_link(renew), LEASE_S, clock)
    keeper.hold("b", 7, clock())
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.vllm"):
        assert keeper.renew_due() == 0
        keeper.hold("c", 8, clock())
        clock.now += 6
        assert keeper.renew_due() == 0
    assert caplog.text.count("does not renew leases") == 1 and keeper.held() == []


def test_the_thread_renews_while_the_scheduler_waits_for_a_long_step() -> None:
    """vLLM's scheduler builds no plan while a step runs: a step longer than the lease would let
    the leases of the next step's loads lapse. Real time, a lease of 1 s."""
    sim = Sim(make_client(4, lease_timeout_s=1.0))
    a = FakeRequest("a", PROMPT)
    sim.admit(a)
    sim.step({a: 9})
    b = FakeRequest("b", PROMPT)
    plan_b = plan_load(sim, b)
    sim.sched.leases.start()
    thread = sim.sched.leases._thread
    assert thread is not None and thread.is_alive()
    try:
        time.sleep(2.5)  # the long step
        sim.client.lookup([])  # (reaps expired leases)
        assert sim.leases() == 1
        run_late(sim, plan_b, b)
        assert not sim.failed and sim.block_is_right(b, 0) and sim.block_is_right(b, 1)
    finally:
        sim.sched.leases.close()
    assert not thread.is_alive()


def test_a_failure_on_the_renewing_thread_reaches_the_scheduler() -> None:
    def renew(ids: Sequence[int]) -> list[int]:
        raise ZeroDivisionError("a bug")

    keeper = LeaseKeeper(fake_link(renew), 0.04)
    keeper.hold("b", 7, time.monotonic())
    keeper.start()
    deadline = time.monotonic() + 10
    while keeper._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.close()
    with pytest.raises(RuntimeError, match="renewing the scheduler's leases failed") as info:
        keeper.renew_due()
    assert isinstance(info.value.__cause__, ZeroDivisionError)

