"""vLLM's streaming-input sessions (resumable requests): the prompt grows in place under one
request id, and the connector keys it anew. With fake requests, the CPU worker and a real
in-process store."""

from __future__ import annotations

from .sim import BLOCK, FakeRequest, Sim


def test_a_streaming_session_whose_prompt_grew_is_keyed_anew() -> None:
    """Bug: vLLM grows a streaming session's prompt in place (same request id: computed outputs
    kept, the last sampled token dropped, the new input appended), but the connector kept the
    first prompt's partial-chunk key: after a preemption it loaded the first turn's tokens 12-13
    at positions 16-17 of the new prompt."""
    sim = Sim(save_decode=True)
    s = FakeRequest("s", list(range(200, 214)))  # 14 tokens: 3 whole chunks + a partial chunk of 2
    assert sim.admit(s) == 0
    sim.step({s: 14})

    def grow() -> None:
        while len(sim.blocks["s"]) * BLOCK < s.num_tokens:
            sim.blocks["s"].append(sim.free.pop())

    for tok in (1, 2):  # decode o1, o2 (chunk 3 = tokens 12..15 saved: save_decode)
        s.output_token_ids.append(tok)
        grow()
        sim.step({s: 1})
    s.output_token_ids.append(3)  # o3 sampled; the turn ends
    assert s.num_computed_tokens == 16
    s.prompt_token_ids.extend([1, 2, 900, 901])  # as vLLM's _update_request_as_session
    s.output_token_ids.clear()
    grow()
    sim.step({s: 2})  # turn 2's prefill: tokens 16, 17 (and the new partial chunk saved)
    assert sim.tokens_are_right(s, 0, 18)
    sim.preempt(s)
    assert sim.admit(s) == 17  # chunks 0-3 and the new prompt's partial chunk, all but its last token
    sim.step({s: s.num_tokens - s.num_computed_tokens})
    assert sim.tokens_are_right(s, 0, 18) and not sim.failed
