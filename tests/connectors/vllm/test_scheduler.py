"""Scheduler- and worker-side bookkeeping with fake requests and an in-process store (no engine)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import torch

from kvtier.core.errors import TierUnavailableError

from .sim import BLOCK, LAYERS, LAYOUT, FakeLora, FakeRequest, Sim, make_client, token_value, write_cpu_token

PROMPT = list(range(100, 113))  # 13 tokens: 3 full chunks of 4 + 1


def run_prefill(sim: Sim, req: FakeRequest, local: int = 0) -> int:
    ext = sim.admit(req, local)
    sim.step({req: req.num_tokens - req.num_computed_tokens})
    return ext


def test_first_request_saves_every_full_prompt_chunk() -> None:
    sim = Sim()
    a = FakeRequest("a", PROMPT)
    assert run_prefill(sim, a) == 0
    (plan,) = sim.plans
    assert [len(s.keys) for s in plan.saves] == [3]
    assert plan.saves[0].block_ids == sim.blocks["a"][:3]
    assert plan.saves[0].first_depth == 0
    assert sim.sched.reqs["a"].chain is not None
    assert plan.saves[0].parent == sim.sched.reqs["a"].chain.root


def test_hit_ends_one_token_before_prompt_end_and_loads_right_kv() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)  # 13 tokens, 3 chunks stored: 12 tokens, the 13th is computed
    assert sim.admit(b) == 12
    plan = sim.step({b: 1})
    assert [ld.block_ids for ld in plan.loads] == [sim.blocks["b"][:3]]
    assert not plan.saves  # nothing new to save
    assert all(sim.block_is_right(b, c) for c in range(3))
    assert not sim.failed
    assert sim.leases() == 0


def test_prompt_of_whole_chunks_hits_all_but_its_last_token() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT[:12]))
    b = FakeRequest("b", PROMPT[:12])  # the last token sits in chunk 2: it loads whole, 3 of its 4 tokens count
    assert sim.admit(b) == 11
    st = sim.sched.reqs["b"]
    assert st.load is not None and st.load.keys == st.chain.keys[:3]
    plan = sim.step({b: 1})
    assert not plan.saves  # every chunk is in the store already
    assert sim.tokens_are_right(b, 0, 12) and not sim.failed
    assert sim.leases() == 0


PROMPT14 = list(range(200, 214))  # 14 tokens: 3 full chunks of 4 + a partial chunk of 2


def test_prompt_partial_chunk_is_saved_with_zeros_after_its_tokens() -> None:
    sim = Sim()
    a = FakeRequest("a", PROMPT14)
    sim.admit(a)
    for name in LAYERS:  # what an earlier request left in the block of a's partial chunk
        sim.kv[name][sim.blocks["a"][3]].fill_(7.0)
    sim.step({a: 14})
    (plan,) = sim.plans
    full, partial = plan.saves
    chain = sim.sched.reqs["a"].chain
    assert (len(full.keys), full.last_valid) == (3, 0)
    assert partial.keys == [chain.partial_key()] and partial.last_valid == 2
    assert (partial.parent, partial.first_depth, partial.block_ids) == (chain.keys[2], 3, [sim.blocks["a"][3]])
    # the stored partial chunk holds a's two tokens, then zeros (not the 7s left in the block)
    page = torch.zeros(LAYOUT.num_kv_heads, BLOCK, 2 * LAYOUT.head_size)
    dests = [[page.view(torch.uint8).numpy().reshape(-1).copy() for _ in LAYERS]]
    assert sim.client.load(partial.keys, dests).wait().loaded == 1
    for layer in range(len(LAYERS)):
        want = torch.zeros_like(page)
        for pos in (12, 13):
            write_cpu_token(want, pos % BLOCK, token_value(PROMPT14, pos, layer))
        got = torch.from_numpy(dests[0][layer]).view(torch.float32).view_as(page)
        assert torch.equal(got, want)


def admit_repeat_of_prompt14(sim: Sim) -> tuple[FakeRequest, Any]:
    """Request "a" computes and saves PROMPT14; "b", the same prompt, is admitted with its hit."""
    run_prefill(sim, FakeRequest("a", PROMPT14))
    b = FakeRequest("b", PROMPT14)
    assert sim.admit(b) == 13  # 3 whole chunks and 1 of the partial chunk's 2 tokens
    return b, sim.sched.reqs["b"]


def test_exact_repeat_hits_all_but_the_last_token_through_the_partial_chunk() -> None:
    sim = Sim()
    b, st = admit_repeat_of_prompt14(sim)
    assert st.load is not None and st.load.keys == [*st.chain.keys, st.partial]
    assert st.load.block_ids == sim.blocks["b"]
    assert sim.sched.loaded_by_tier == {"memory": 4} and sim.sched.loaded_tokens_by_tier == {"memory": 13}
    plan = sim.step({b: 1})
    assert not plan.saves  # the partial chunk came from the store: not saved again
    assert sim.tokens_are_right(b, 0, 14) and not sim.failed
    assert sim.leases() == 0


def test_partial_chunk_hits_only_the_same_whole_prompt() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT14))
    longer = FakeRequest("b", PROMPT14 + [5])  # its tail is 3 tokens: a different partial chunk
    assert sim.admit(longer) == 12
    other = FakeRequest("c", PROMPT14[:13] + [6])  # same length, other last token
    assert sim.admit(other) == 12
    resumed = FakeRequest("d", PROMPT14, output_token_ids=[1, 2])  # preempted with output: not a prompt end
    assert sim.admit(resumed) == 12


def test_one_token_tail_saves_no_partial_chunk_and_partials_can_be_off() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))  # 13 = 3 x 4 + 1: a partial of 1 token would load nothing
    assert [s.last_valid for s in sim.plans[0].saves] == [0]
    off = Sim()
    off.sched.partial_chunks = False
    run_prefill(off, FakeRequest("a", PROMPT14))
    assert [s.last_valid for s in off.plans[0].saves] == [0]
    assert off.admit(FakeRequest("b", PROMPT14)) == 12


def test_failed_partial_chunk_load_is_recomputed_and_saved_again() -> None:
    sim = Sim()
    b, st = admit_repeat_of_prompt14(sim)
    assert st.load is not None and st.load.lease_id is not None and sim.client.store.memory is not None
    sim.client.release(st.load.lease_id)  # as if the lease expired ...
    assert sim.client.store.memory.delete(st.partial)  # ... and the partial chunk was evicted
    sim.step({b: 1})
    assert sim.failed == {sim.blocks["b"][3]}
    sim.sched.load_errors(sim.failed)
    assert not st.partial_stored and st.stored_upto == 3
    b.num_computed_tokens = 12  # vLLM rolls back to the failed block's start and recomputes it
    plan = sim.step({b: 2})
    assert [(s.keys, s.last_valid) for s in plan.saves] == [([st.partial], 2)]
    assert sim.tokens_are_right(b, 0, 14)


def test_partial_chunk_prefix_hits_whole_chunks_only() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT[:6] + [7, 7, 7, 7, 7, 7, 7])  # shares 1.5 chunks
    assert sim.admit(b) == 4
    plan = sim.step({b: b.num_tokens - 4})
    assert sim.block_is_right(b, 0)
    assert [(s.first_depth, len(s.keys)) for s in plan.saves] == [(1, 2)]  # its own chunks 1, 2
    assert plan.saves[0].parent == sim.sched.reqs["b"].chain.keys[0]


def test_hit_after_vllm_local_hit_loads_only_the_rest() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT + [1, 2, 3])  # 16 tokens
    assert sim.admit(b, local_hit_tokens=4) == 8  # chunks 1, 2 from kvtier; 3 holds the last token
    plan = sim.step({b: 4}, run_worker=False)
    assert plan.loads[0].block_ids == sim.blocks["b"][1:3]
    assert [(s.first_depth, len(s.keys)) for s in plan.saves] == [(3, 1)]


def test_chunked_prefill_saves_each_chunk_when_complete() -> None:
    sim = Sim()
    a = FakeRequest("a", PROMPT)
    sim.admit(a)
    depths = []
    for n in (5, 5, 3):
        plan = sim.step({a: n})
        depths.append([(s.first_depth, len(s.keys)) for s in plan.saves])
    assert depths == [[(0, 1)], [(1, 1)], [(2, 1)]]
    b = FakeRequest("b", PROMPT)
    assert sim.admit(b) == 12
    sim.step({b: 1})
    assert all(sim.block_is_right(b, c) for c in range(3))


def test_decode_chunks_saved_only_with_save_decode() -> None:
    for save_decode, expect in ((False, 3), (True, 4)):
        sim = Sim(save_decode=save_decode)
        a = FakeRequest("a", PROMPT)
        sim.admit(a)
        sim.step({a: 13})
        for tok in (1, 2, 3, 4):  # decode: each step computes the KV of the previous token
            a.output_token_ids.append(tok)
            sim.blocks["a"] += [sim.free.pop()] if len(sim.blocks["a"]) * BLOCK < a.num_tokens else []
            sim.step({a: 1})
        assert sum(len(s.keys) for p in sim.plans for s in p.saves) == expect


def test_preempted_request_reloads_what_it_saved() -> None:
    sim = Sim()
    a = FakeRequest("a", PROMPT)
    sim.admit(a)
    sim.step({a: 9})  # chunks 0, 1 saved
    sim.preempt(a)
    assert sim.admit(a) == 8  # resumed: vLLM asks again, kvtier has chunks 0-1
    plan = sim.step({a: 5})
    assert plan.loads[0].block_ids == sim.blocks["a"][:2]
    assert [(s.first_depth, len(s.keys)) for s in plan.saves] == [(2, 1)]  # no chunk saved twice
    assert all(sim.block_is_right(a, c) for c in range(3))


def test_repeated_lookup_replaces_lease() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    assert sim.sched.num_new_matched_tokens(b, 0) == 12
    assert sim.sched.num_new_matched_tokens(b, 0) == 12  # allocation failed; vLLM asks again
    assert sim.leases() == 1
    sim.sched.after_alloc(b, [], 0)  # scheduled without the external tokens
    assert sim.leases() == 0


def test_abort_before_load_is_shipped_releases_lease() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    assert sim.sched.num_new_matched_tokens(b, 0) == 12
    sim.finish(b)
    assert sim.leases() == 0 and "b" not in sim.sched.reqs


def test_abort_while_load_in_flight() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    sim.admit(b)
    plan = sim.step({b: 1}, run_worker=False)  # the load is shipped to the worker...
    sim.sched.request_finished(b)  # ...and the request is aborted before the worker runs it
    assert sim.leases() == 1  # the worker owns the lease now
    sim.run_worker(plan, {b: 1})
    assert sim.leases() == 0 and not sim.failed
    assert "b" not in sim.sched.reqs


def test_corrupt_partial_chunk_leaves_no_garbage_past_the_prompt_end() -> None:
    sim = Sim()
    b, st = admit_repeat_of_prompt14(sim)
    memory = sim.client.store.memory
    assert memory is not None and st.partial is not None
    slot = memory.slot_of(st.partial)
    assert slot is not None
    memory.slot_view(slot)[:] = 0xFF  # every float a NaN: the load copies it, then its checksum fails
    sim.step({b: 1})
    block = sim.blocks["b"][3]
    assert sim.failed == {block}
    assert all(not sim.kv[name][block].isnan().any() and not sim.kv[name][block].any() for name in LAYERS)
    sim.sched.load_errors(sim.failed)
    b.num_computed_tokens = 12  # vLLM recomputes from the failed block's start
    sim.step({b: 2})
    assert sim.tokens_are_right(b, 0, 14)
    assert all(not sim.kv[name][block].isnan().any() for name in LAYERS)  # rows 2, 3: zeros, never NaN


def test_lease_expiry_reports_exactly_the_evicted_blocks() -> None:
    client = make_client(capacity_chunks=4, lease_timeout_s=0.05)
    sim = Sim(client)
    run_prefill(sim, FakeRequest("a", PROMPT[:9]))  # 2 chunks stored
    b = FakeRequest("b", PROMPT[:9])
    assert sim.admit(b) == 8
    plan = sim.step({b: 1}, run_worker=False)
    time.sleep(0.1)
    assert client._host is not None and client._host.expire() == 1
    # Evict the second chunk only: touch the first, then fill the pool with other chunks.
    first, second = plan.loads[0].keys
    client.lookup([first])
    run_prefill(sim, FakeRequest("c", [9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7, 1]))
    assert client.lookup([second]).hits == 0 and client.lookup([first]).hits == 1
    sim.run_worker(plan, {b: 1})
    assert sim.failed == {plan.loads[0].block_ids[1]}
    assert sim.block_is_right(b, 0)
    sim.sched.load_errors(sim.failed)  # vLLM recomputes chunk 1: kvtier saves it again
    assert sim.sched.reqs["b"].stored_upto == 1


def test_store_down_means_no_hits_and_failed_loads_never_errors() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    sim.admit(b)
    plan = sim.step({b: 1}, run_worker=False)

    class Dead:
        def __getattr__(self, name: str):  # every store call fails like a dead service
            def fail(*a, **k):
                raise TierUnavailableError("the kvtier service went away")
            return fail

    sim.link._client = Dead()  # type: ignore[assignment]
    sim.link._connect = lambda first: (_ for _ in ()).throw(TierUnavailableError("down"))  # type: ignore[assignment]
    sim.run_worker(plan, {b: 1})
    assert sim.failed == set(plan.loads[0].block_ids)
    c = FakeRequest("c", PROMPT)
    assert sim.admit(c) == 0
    sim.step({c: 13})  # saves are dropped, nothing raises


@pytest.mark.parametrize("kind", ["mm", "embeds", "no_tokens"])
def test_unkeyable_requests_get_no_hits_and_save_nothing(kind: str) -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT))
    b = FakeRequest("b", PROMPT)
    if kind == "mm":
        b.mm_features = [object()]
    elif kind == "embeds":
        b.prompt_embeds = object()
    else:
        b.prompt_token_ids = None
    assert sim.sched.num_new_matched_tokens(b, 0) == 0
    assert sim.sched.reqs["b"].chain is None


def test_cache_salt_and_lora_name_separate_namespaces() -> None:
    sim = Sim()
    run_prefill(sim, FakeRequest("a", PROMPT, cache_salt="tenant-1"))
    assert sim.sched.num_new_matched_tokens(FakeRequest("b", PROMPT), 0) == 0
    assert sim.sched.num_new_matched_tokens(FakeRequest("c", PROMPT, cache_salt="tenant-2"), 0) == 0
    assert sim.sched.num_new_matched_tokens(FakeRequest("d", PROMPT, cache_salt="tenant-1"), 0) == 12
    run_prefill(sim, FakeRequest("e", PROMPT, lora_request=FakeLora("sql", 1)))
    assert sim.sched.num_new_matched_tokens(FakeRequest("f", PROMPT, lora_request=FakeLora("sql", 7)), 0) == 12
    assert sim.sched.num_new_matched_tokens(FakeRequest("g", PROMPT, lora_request=FakeLora("chat", 1)), 0) == 0


def test_two_requests_sharing_a_prefix_in_one_batch() -> None:
    sim = Sim()
    a = FakeRequest("a", PROMPT[:8] + [1, 2, 3, 4, 5])
    b = FakeRequest("b", PROMPT[:8] + [6, 7, 8, 9, 10])
    sim.admit(a)
    sim.admit(b)
    sim.step({a: 13, b: 13})
    c = FakeRequest("c", PROMPT[:8] + [6, 7, 8, 9, 11])
    d = FakeRequest("d", PROMPT[:8] + [1, 2, 3, 4, 6])
    assert sim.admit(c) == 12 and sim.admit(d) == 12
    sim.step({c: 1, d: 1})
    assert all(sim.block_is_right(r, k) for r in (c, d) for k in range(3))


def test_saved_chunks_carry_vllms_block_hashes_and_are_reported_once() -> None:
    from kvtier.core.codec import SECTION_BLOCK_HASHES, decode_block_hashes

    sim = Sim()
    sim.sched.convert_hash = lambda h: int.from_bytes(h, "big") & (2**64 - 1)  # vLLM's int form
    a = FakeRequest("a", PROMPT)
    a.block_hashes = [hashlib.sha256(repr(PROMPT[:(i + 1) * BLOCK]).encode()).digest()  # type: ignore[attr-defined]
                      for i in range(len(PROMPT) // BLOCK)]
    want = [sim.sched.convert_hash(h) for h in a.block_hashes]  # type: ignore[attr-defined]
    run_prefill(sim, a)
    (save,) = sim.plans[0].saves
    assert save.block_hashes is not None
    assert [decode_block_hashes(d) for d in save.block_hashes] == [
        (None, [want[0]]), (want[0], [want[1]]), (want[1], [want[2]])]
    store = sim.client.store
    for key, data in zip(save.keys, save.block_hashes, strict=True):
        assert store.read_section(key, SECTION_BLOCK_HASHES, 0) == data  # stored beside the chunk
    blocks = sim.sched.take_saved_blocks()
    assert [(b.block_hash, b.parent, b.token_ids) for b in blocks] == [
        (want[i], want[i - 1] if i else None, PROMPT[i * BLOCK:(i + 1) * BLOCK]) for i in range(3)]
    assert sim.sched.take_saved_blocks() == []  # taken once
    b = FakeRequest("b", PROMPT)  # no block_hashes (not a vLLM request): saved without the section
    sim2 = Sim()
    sim2.sched.convert_hash = sim.sched.convert_hash
    run_prefill(sim2, b)
    assert sim2.plans[0].saves[0].block_hashes is None and sim2.sched.take_saved_blocks() == []
