"""Synthetic request traces of different shapes, in the Mooncake record shape, for `kvtier bench trace`.

A default eviction policy tuned on one production trace must not lose to LRU on traffic it was not
tuned on (issue 16). These generators make that traffic: each is a pure function of a seed and a
request count (same arguments, same trace, on any machine: `random.Random(seed)`, no hashing of
strings), metadata only, returning TraceRequest records with the Mooncake fields (timestamp ms,
input_length, output_length, hash_ids of 512-token blocks, the last block partial), so
`simulate_tier` and `kvtier bench trace --trace synthetic:NAME` replay them like the real trace.

Shapes (SYNTHETIC_TRACES, `generate(name, seed, requests)`):
    zipf           documents of 1-16 blocks asked for by a fixed Zipf popularity, each with a fresh question
    zipf_drift     the same, but which documents are popular moves to unseen ones every sixth of the trace
    scan           a Zipf hot set interleaved with long scans of one-off documents, several times the
                   cache; half the scans re-read an earlier scan's corpus
    loop           two loops over fixed documents in fixed order (one large, one small) plus one-off prompts
    conversation   sessions whose every turn extends the previous turn's prompt, turn gaps short (seconds)
                   or long (minutes), some sessions under one of a few shared system prompts
    system_prompt  most requests share one long system prompt, then one of many tool/few-shot prefixes
                   and a fresh question; some follow up on a recent request, the rest are one-off
    shift          `zipf` for a third of the trace, then `conversation` over new blocks: popularity
                   learned early must not squat the cache later
Block ids are allocated in order of first appearance (as in the Mooncake trace); a block shared by
two requests has the same id in both, and a prompt that differs only in its last partial block gets
a fresh id for it. `write_trace` writes a trace as jsonl that `load_trace` reads back unchanged.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from kvtier.bench.trace import BLOCK_TOKENS, TraceRequest
from kvtier.core.errors import ConfigError


class _Builder:
    """Block-id allocation and request records shared by the generators."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._ids = itertools.count()

    def fresh(self, n: int) -> list[int]:
        return [next(self._ids) for _ in range(n)]

    def request(self, ts_ms: float, shared: Sequence[int], tail_tokens: int, output: int) -> TraceRequest:
        """`shared` full blocks (ids reused from earlier requests) then `tail_tokens` fresh tokens."""
        tail = self.fresh(-(-tail_tokens // BLOCK_TOKENS))
        return TraceRequest(round(ts_ms, 3), BLOCK_TOKENS * len(shared) + tail_tokens, output, (*shared, *tail))

    def output(self) -> int:
        return self.rng.randint(20, 800)


class _Document:
    """A fixed prompt: its blocks (the last one partial) keep their ids every time it is asked for."""

    __slots__ = ("ids", "tokens")

    def __init__(self, builder: _Builder, blocks: int) -> None:
        self.ids = tuple(builder.fresh(blocks))
        self.tokens = BLOCK_TOKENS * (blocks - 1) + builder.rng.randint(1, BLOCK_TOKENS)


class _Zipf:
    """Ranks 0..n-1 drawn with probability proportional to 1 / (rank + 1) ** exponent."""

    def __init__(self, rng: random.Random, n: int, exponent: float) -> None:
        self._rng = rng
        total = 0.0
        self._cumulative = []
        for rank in range(n):
            total += 1.0 / (rank + 1) ** exponent
            self._cumulative.append(total)

    def draw(self) -> int:
        at = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, at), len(self._cumulative) - 1)


def _docs_by_popularity(b: _Builder, requests: int, documents: int, exponent: float, phases: int) -> list[TraceRequest]:
    """Requests for lazily created documents of 1-16 blocks by Zipf rank, plus a fresh question each.

    With `phases` > 1 the rank -> document map moves to a disjoint set of documents at every phase.
    """
    rng = b.rng
    zipf = _Zipf(rng, documents, exponent)
    made: dict[int, _Document] = {}
    out = []
    now = 0.0
    per_phase = -(-requests // phases)
    orders = []
    for phase in range(phases):
        order = list(range(phase * documents, (phase + 1) * documents))
        rng.shuffle(order)
        orders.append(order)
    for i in range(requests):
        now += rng.expovariate(1 / 300.0)
        doc_id = orders[i // per_phase][zipf.draw()]
        doc = made.get(doc_id)
        if doc is None:
            doc = made[doc_id] = _Document(b, rng.randint(1, 16))
        shared = doc.ids[:-1]  # the document's last block is partial: the question completes it
        tail = doc.tokens - BLOCK_TOKENS * len(shared) + rng.randint(30, 600)
        out.append(b.request(now, shared, tail, b.output()))
    return out


def zipf(seed: int, requests: int = 12000) -> list[TraceRequest]:
    return _docs_by_popularity(_Builder(seed), requests, documents=3000, exponent=0.9, phases=1)


def zipf_drift(seed: int, requests: int = 12000) -> list[TraceRequest]:
    return _docs_by_popularity(_Builder(seed), requests, documents=1500, exponent=0.9, phases=6)


def scan(seed: int, requests: int = 12000) -> list[TraceRequest]:
    """A hot set (Zipf over 300 documents of 2-8 blocks) with scans of 4-12 block documents between.

    Eight scan jobs run one after another, each over its own corpus or (every other job) again over
    an earlier job's corpus; while a job runs, 60% of requests are its next document.
    """
    b = _Builder(seed)
    rng = b.rng
    hot = [_Document(b, rng.randint(2, 8)) for _ in range(300)]
    zipf_hot = _Zipf(rng, len(hot), 1.0)
    jobs = 8
    per_job = requests // jobs
    corpora: list[list[_Document]] = []
    out: list[TraceRequest] = []
    now = 0.0
    for job in range(jobs):
        if job % 2 == 1 and corpora:
            corpus = corpora[rng.randrange(len(corpora))]
        else:
            corpus = [_Document(b, rng.randint(4, 12)) for _ in range(int(per_job * 0.6))]
            corpora.append(corpus)
        position = 0
        for _ in range(per_job):
            now += rng.expovariate(1 / 300.0)
            if rng.random() < 0.6 and position < len(corpus):
                doc = corpus[position]
                position += 1
                out.append(b.request(now, doc.ids[:-1], doc.tokens - BLOCK_TOKENS * (len(doc.ids) - 1), b.output()))
            else:
                doc = hot[zipf_hot.draw()]
                out.append(b.request(now, doc.ids, rng.randint(30, 600), b.output()))
    return out


def loop(seed: int, requests: int = 12000) -> list[TraceRequest]:
    """Half the requests walk a large loop of 1,200 documents in fixed order, 30% a small loop of
    60, the rest are one-off prompts; each document of 2-10 blocks is asked for whole, unchanged."""
    b = _Builder(seed)
    rng = b.rng
    large = [_Document(b, rng.randint(2, 10)) for _ in range(1200)]
    small = [_Document(b, rng.randint(2, 10)) for _ in range(60)]
    at_large = at_small = 0
    out = []
    now = 0.0
    for _ in range(requests):
        now += rng.expovariate(1 / 300.0)
        draw = rng.random()
        if draw < 0.5:
            doc = large[at_large % len(large)]
            at_large += 1
        elif draw < 0.8:
            doc = small[at_small % len(small)]
            at_small += 1
        else:
            out.append(b.request(now, (), rng.randint(BLOCK_TOKENS, 8 * BLOCK_TOKENS), b.output()))
            continue
        out.append(TraceRequest(round(now, 3), doc.tokens, b.output(), doc.ids))
    return out


def conversation(seed: int, requests: int = 12000) -> list[TraceRequest]:
    """Multi-turn sessions: each turn's prompt is the previous prompt, its reply and a new message.

    Sessions start every 1.5 s on average and last 1-15 turns (geometric, mean 4); a turn follows
    the previous reply after a short gap (mean 20 s) or, one time in three, a long one (5-40
    minutes). Half the sessions open with one of four shared system prompts of 1-6 blocks. The full
    blocks of the previous prompt keep their ids; the block that held its partial tail does not.
    A session ends past 32k tokens.
    """
    b = _Builder(seed)
    rng = b.rng
    systems = [b.fresh(rng.randint(1, 6)) for _ in range(4)]
    events: list[tuple[float, int, TraceRequest]] = []
    start = 0.0
    order = itertools.count()
    while len(events) < requests:
        start += rng.expovariate(1 / 400.0)
        ids: tuple[int, ...] = tuple(rng.choice(systems)) if rng.random() < 0.5 else ()
        prompt = BLOCK_TOKENS * len(ids)  # tokens of the previous prompt
        reply = 0
        now = start
        turns = 1
        while rng.random() > 0.25 and turns < 15:
            turns += 1
        for _ in range(turns):
            kept = ids[: prompt // BLOCK_TOKENS]  # the previous prompt's full blocks
            prompt += reply + rng.randint(20, 3000)
            if prompt > 32768:
                break
            req = b.request(now, kept, prompt - BLOCK_TOKENS * len(kept), b.output())
            events.append((now, next(order), req))
            ids, reply = req.hash_ids, req.output_length
            gap = rng.uniform(300_000, 2_400_000) if rng.random() < 1 / 3 else rng.expovariate(1 / 20_000)
            now += gap
    events.sort()
    return [req for _, _, req in events[:requests]]


def system_prompt(seed: int, requests: int = 12000) -> list[TraceRequest]:
    """70% of requests start with one 24-block system prompt, then one of 200 tool/few-shot prefixes
    (2-6 blocks, Zipf) and a fresh question; 10% follow up on one of the last 50 such requests
    (its whole prompt, then a fresh message); 20% are one-off prompts of 1-20 blocks."""
    b = _Builder(seed)
    rng = b.rng
    system = b.fresh(24)
    tools = [b.fresh(rng.randint(2, 6)) for _ in range(200)]
    zipf_tools = _Zipf(rng, len(tools), 1.0)
    recent: list[TraceRequest] = []
    out = []
    now = 0.0
    for _ in range(requests):
        now += rng.expovariate(1 / 300.0)
        draw = rng.random()
        if draw < 0.7:
            req = b.request(now, system + tools[zipf_tools.draw()], rng.randint(30, 1500), b.output())
            recent = [*recent[-49:], req]
        elif draw < 0.8 and recent:
            base = rng.choice(recent)
            full = base.hash_ids[: base.input_length // BLOCK_TOKENS]
            tail = base.input_length - BLOCK_TOKENS * len(full) + rng.randint(30, 1500)
            req = b.request(now, full, tail, b.output())
        else:
            req = b.request(now, (), rng.randint(1, 20 * BLOCK_TOKENS), b.output())
        out.append(req)
    return out


def shift(seed: int, requests: int = 12000) -> list[TraceRequest]:
    """A Zipf hot set (as `zipf`) for the first third, then multi-turn conversations (as
    `conversation`) over new blocks: a policy that learned to keep popular chunks must let them go."""
    first = zipf(seed, max(1, requests // 3))
    offset = 1 + max(h for r in first for h in r.hash_ids)
    start = first[-1].timestamp_ms
    second = conversation(seed + 1, requests - len(first)) if requests > len(first) else []
    moved = [TraceRequest(round(start + r.timestamp_ms, 3), r.input_length, r.output_length,
                          tuple(h + offset for h in r.hash_ids)) for r in second]
    return first + moved


SYNTHETIC_TRACES: dict[str, Callable[..., list[TraceRequest]]] = {
    "zipf": zipf,
    "zipf_drift": zipf_drift,
    "scan": scan,
    "loop": loop,
    "conversation": conversation,
    "system_prompt": system_prompt,
    "shift": shift,
}


def generate(name: str, seed: int = 0, requests: int = 12000) -> list[TraceRequest]:
    """The synthetic trace `name` (a key of SYNTHETIC_TRACES); ConfigError naming the choices if unknown."""
    try:
        make = SYNTHETIC_TRACES[name]
    except KeyError:
        raise ConfigError(f"synthetic trace {name!r} is unknown; choose one of {sorted(SYNTHETIC_TRACES)}") from None
    if requests < 1:
        raise ConfigError(f"a synthetic trace needs requests >= 1, got {requests}")
    return make(seed, requests)


def write_trace(requests: Sequence[TraceRequest], path: str | Path) -> None:
    """Write `requests` as Mooncake-format jsonl (one object a line)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in requests:
            ts = int(r.timestamp_ms) if r.timestamp_ms == int(r.timestamp_ms) else r.timestamp_ms
            f.write(json.dumps({"timestamp": ts, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")
