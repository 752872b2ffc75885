"""The connector's take_events: the blocks its own instance saved, as vLLM's BlockStored, which
vLLM's publisher encodes and kvtier's router reads (vLLM's own msgspec classes on the way out)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import msgspec
import pytest

kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vllm is not installed")
connector = pytest.importorskip("kvtier.connectors.vllm.connector", reason="vllm is not installed")

from kvtier.events import BatchCodec  # noqa: E402
from kvtier.router import KVIndex  # noqa: E402

from .sim import BLOCK, FakeRequest, Sim  # noqa: E402
from .test_scheduler import PROMPT, run_prefill  # noqa: E402


def test_take_events_reports_this_instances_saves_once_under_vllms_hashes() -> None:
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    sim = Sim()
    sim.sched.convert_hash = maybe_convert_block_hash
    req = FakeRequest("a", PROMPT)
    req.block_hashes = [hashlib.sha256(repr(PROMPT[:(i + 1) * BLOCK]).encode()).digest()  # type: ignore[attr-defined]
                        for i in range(len(PROMPT) // BLOCK)]
    run_prefill(sim, req)
    me = SimpleNamespace(scheduler=sim.sched, chunk_tokens=BLOCK)
    events = list(connector.KVTierConnector.take_events(me))  # type: ignore[arg-type]
    assert all(isinstance(e, kv_events.BlockStored) for e in events) and len(events) == 3
    assert list(connector.KVTierConnector.take_events(me)) == []  # once
    # vLLM's publisher encodes the batch with its own classes; kvtier's router decodes it
    payload = msgspec.msgpack.encode(kv_events.KVEventBatch(ts=1.0, events=events))
    batch = BatchCodec("map").decode(payload)
    index = KVIndex(block_size=BLOCK)
    index.apply("vllm-0", "vllm", batch)
    want = [maybe_convert_block_hash(h) for h in req.block_hashes]  # type: ignore[attr-defined]
    assert index.blocks("vllm-0", "CPU") == set(want)
    assert index.score("vllm-0", want) == pytest.approx(3 * 0.8)
    assert [e.parent_block_hash for e in batch.events] == [None, want[0], want[1]]
    assert [e.token_ids for e in batch.events] == [PROMPT[i * BLOCK:(i + 1) * BLOCK] for i in range(3)]
