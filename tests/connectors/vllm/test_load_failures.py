"""A failed load never leaves wrong KV behind: not in vLLM's step output (the failure is reported
in the step it happened, whatever order vLLM calls the hooks in) and not in the store (nothing
computed over the failed blocks is published). With fake requests, the CPU worker and a real
in-process store."""

from __future__ import annotations

import torch

from .sim import LAYERS, FakeRequest, Sim, read_cpu_token, token_value, write_cpu_token

PROMPT = list(range(100, 113))  # 13 tokens: 3 whole chunks of 4 + 1


class CausalSim(Sim):
    """A token's K/V in layer L >= 1 depends on the K/V of the positions before it in layer L-1,
    as attention makes it: over a block a failed load left zeroed, it comes out wrong."""

    def _prefix_right(self, r: FakeRequest, end: int, layer: int) -> bool:
        n = self.block_size
        for pos in range(end):
            page = self.kv[LAYERS[layer]][self.blocks[r.request_id][pos // n]]
            want = torch.zeros_like(page)
            write_cpu_token(want, pos % n, token_value(r.all_token_ids, pos, layer))
            (gk, gv), (wk, wv) = read_cpu_token(page, pos % n), read_cpu_token(want, pos % n)
            if not (torch.equal(gk, wk) and torch.equal(gv, wv)):
                return False
        return True

    def write_token(self, r: FakeRequest, pos: int, layer: int) -> None:
        value = token_value(r.all_token_ids, pos, layer)
        if layer > 0 and not self._prefix_right(r, pos, layer - 1):
            value += 0.5  # attention over wrong K/V: a wrong hidden state, a wrong K/V
        block = self.blocks[r.request_id][pos // self.block_size]
        write_cpu_token(self.kv[LAYERS[layer]][block], pos % self.block_size, value)


def lose_chunk_1(sim: Sim, req: str) -> None:
    """The lease of `req`'s planned load lapsed and its chunk 1 was evicted: that load fails."""
    st = sim.sched.reqs[req]
    assert st.load is not None and st.chain is not None
    sim.client.release(st.load.lease_id)
    assert sim.client.store.memory.delete(st.chain.keys[1])


def test_chunks_computed_in_the_step_of_a_failed_load_are_not_published() -> None:
    """Bug: b loads chunks 0-1 and computes chunk 2 in one step; chunk 1's load failed, so chunk 2
    was computed over a zeroed block, yet it was published, and the store keeps a key's first
    copy: after b's recompute, a later request with the same prompt was served the wrong chunk 2."""
    sim = CausalSim()
    a = FakeRequest("a", PROMPT[:9])
    sim.admit(a)
    sim.step({a: 9})  # stores chunks 0 and 1
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 8
    lose_chunk_1(sim, "b")
    plan = sim.step({b: 5})
    assert [(s.first_depth, len(s.keys)) for s in plan.saves] == [(2, 1)]  # chunk 2 planned in this step
    assert sim.failed == {sim.blocks["b"][1]}
    sim.sched.load_errors(sim.failed)  # vLLM rolls b back to the failed block and recomputes
    sim.failed = set()
    b.num_computed_tokens = 4
    sim.step({b: 9})
    sim.step({b: 0})  # a step after: a failure two steps back no longer drops saves
    assert sim.tokens_are_right(b, 0, 13)
    sim.finish(b)
    c = FakeRequest("c", PROMPT)
    assert sim.admit(c) == 12  # b's recompute saved chunks 1 and 2 again, right this time
    sim.step({c: 1})
    assert not sim.failed
    assert all(sim.block_is_right(c, i) for i in range(3))


def test_saves_of_the_step_after_a_failed_load_are_not_published_either() -> None:
    """With async scheduling vLLM schedules step N+1 before it hears of step N's failure: the
    failed request computes on over the zeroed block once more, and that is not published."""
    sim = CausalSim()
    a = FakeRequest("a", PROMPT[:9])
    sim.admit(a)
    sim.step({a: 9})
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 8
    lose_chunk_1(sim, "b")
    sim.step({b: 1})  # the failed load; token 8 only: no chunk completes
    assert sim.failed == {sim.blocks["b"][1]}
    plan = sim.step({b: 4})  # scheduled blind: completes chunk 2 over the zeroed chunk 1
    assert [(s.first_depth, len(s.keys)) for s in plan.saves] == [(2, 1)]
    assert sim.client.lookup(sim.sched.reqs["b"].chain.keys[2:3]).hits == 0  # not published


def test_a_failed_load_is_reported_in_its_own_step_when_vllm_asks_before_wait_for_save() -> None:
    """Bug: with speculative decoding vLLM 0.32 takes get_block_ids_with_load_errors into the step's
    output before wait_for_save (which runs after the drafter), and the worker found its failures
    only in wait_for_save: the step's output said nothing, so vLLM sampled from the zeroed block
    and cached it as computed."""
    sim = Sim()
    a = FakeRequest("a", PROMPT[:9])
    sim.admit(a)
    sim.step({a: 9})
    b = FakeRequest("b", PROMPT[:9])
    assert sim.admit(b) == 8
    lose_chunk_1(sim, "b")
    plan = sim.step({b: 1}, run_worker=False)
    w = sim.worker
    w.start_step(plan)  # vLLM's order with a speculative config:
    w.start_loads()
    for layer, name in enumerate(LAYERS):
        w.wait_layer(name)
        sim.write_token(b, 8, layer)
        w.save_layer(name)
    reported = w.take_failed_blocks()  # this step's KVConnectorOutput.invalid_block_ids
    w.finish_step()  # finalize_kv_connector, after the drafter
    assert reported == {sim.blocks["b"][1]}
    assert w.take_failed_blocks() == set()  # reported once



OTHER = list(range(500, 513))


def test_a_neighbours_saves_dropped_for_a_failed_load_are_saved_again() -> None:
    """Bug: the worker drops every save of a step with a failed load (a neighbour may share the
    failed blocks), but the scheduler rewound only the failed request: c's chunks counted as saved,
    were never saved again, and a repeat of c's prompt missed the store."""
    sim = CausalSim()
    a = FakeRequest("a", PROMPT[:9])
    sim.admit(a)
    sim.step({a: 9})
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 8
    lose_chunk_1(sim, "b")
    c = FakeRequest("c", OTHER)
    assert sim.admit(c) == 0
    plan = sim.step({b: 5, c: 13})  # b's load fails; c computes its prompt and plans chunks 0-2
    assert ("c", 0, 3) in [(s.req_id, s.first_depth, len(s.keys)) for s in plan.saves]
    assert sim.failed
    sim.sched.load_errors(sim.failed)
    sim.failed = set()
    assert sim.client.lookup(sim.sched.reqs["c"].chain.keys).hits == 0  # dropped with the step's saves
    b.num_computed_tokens = 4
    c.output_token_ids.append(7)
    plan = sim.step({b: 9, c: 1})
    assert ("c", 0, 3) in [(s.req_id, s.first_depth, len(s.keys)) for s in plan.saves]  # planned again
    sim.step({c: 1})
    sim.finish(b)
    sim.finish(c)
    d = FakeRequest("d", OTHER)
    assert sim.admit(d) == 12
    sim.step({d: 1})
    assert not sim.failed and all(sim.block_is_right(d, i) for i in range(3))
