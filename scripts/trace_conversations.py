"""How predictable reuse is on a Mooncake-format trace: conversations, their next turns, and what
an online cache could know about them.

    python scripts/trace_conversations.py [--trace PATH]

Turns are rebuilt from the chunks alone: request B is the next turn of an earlier request A when
B holds, past B's first two chunks (shared system prompts), the last full chunk of A (a prompt's
last, partial chunk changes when the next turn extends it). Each request gets at most one next
turn, the first such B. Prints:

- the share of first-seen chunks ever used again, for a prompt's last partial chunk and the rest;
- the time from a request to its next turn (deciles), which a cache must bridge to hit;
- the share of requests that get a next turn, by what is known online when a request arrives:
  its turn number, the time since its previous turn, and its length in chunks.

Issue 7 uses these to explain why no online policy found so far closes half of the gap between
LRU and Belady's MIN at small capacities: see `kvtier bench trace` and its "LRU + future admission"
column for the part that does not depend on any predictor.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from kvtier.bench.trace import BLOCK_TOKENS, DEFAULT_TRACE, TraceRequest, load_trace

SHARED_HEAD = 2  # chunks at the head of a prompt that many conversations share
GAP_EDGES = (30, 60, 120, 240)
SIZE_EDGES = (8, 16, 32)


def full_chunks(req: TraceRequest) -> int:
    return len(req.hash_ids) - (1 if req.input_length % BLOCK_TOKENS else 0)


def next_turns(requests: Sequence[TraceRequest]) -> tuple[list[int | None], list[int | None]]:
    """(previous turn, next turn) of each request, as request indexes or None."""
    last_full: dict[int, int] = {}  # a request's last full chunk -> that request
    prev: list[int | None] = [None] * len(requests)
    nxt: list[int | None] = [None] * len(requests)
    for i, req in enumerate(requests):
        ids = req.hash_ids
        for depth in range(len(ids) - 1, SHARED_HEAD - 1, -1):  # the deepest match wins
            j = last_full.get(ids[depth])
            if j is not None:
                if nxt[j] is None:
                    prev[i], nxt[j] = j, i
                break
        n = full_chunks(req)
        if n:
            last_full[ids[n - 1]] = i
    return prev, nxt


def share_table(title: str, rows: dict[object, list[bool]], order: Sequence[object]) -> None:
    print(title)
    for key in order:
        flags = rows.get(key)
        if not flags:
            continue
        print(f"  {key!s:>12}: {len(flags):6d} requests, {sum(flags) / len(flags):.3f} get a next turn")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    args = parser.parse_args(argv)
    requests = load_trace(args.trace)
    seconds = [r.timestamp_ms / 1000.0 for r in requests]

    uses: Counter[int] = Counter(h for r in requests for h in r.hash_ids)
    seen: set[int] = set()
    reused = {"last partial chunk": [0, 0], "other chunks": [0, 0]}
    for req in requests:
        partial = req.input_length % BLOCK_TOKENS != 0
        for depth, h in enumerate(req.hash_ids):
            if h in seen:
                continue
            seen.add(h)
            row = reused["last partial chunk" if partial and depth == len(req.hash_ids) - 1 else "other chunks"]
            row[0] += 1
            row[1] += uses[h] > 1
    print(f"{len(requests)} requests, {len(seen)} distinct chunks")
    for name, (first, again) in reused.items():
        print(f"  {name}: {first} first seen, {again / max(1, first):.3f} of them used again")

    prev, nxt = next_turns(requests)
    gaps = [seconds[j] - seconds[i] for i, j in enumerate(nxt) if j is not None]
    print(f"{len(gaps)} requests get a next turn ({len(gaps) / len(requests):.3f}); seconds to it, deciles:",
          [round(g) for g in statistics.quantiles(gaps, n=10)])

    turn = [0] * len(requests)
    for i, p in enumerate(prev):
        if p is not None:
            turn[i] = turn[p] + 1

    def by(key: Callable[[int], object]) -> dict[object, list[bool]]:
        rows: dict[object, list[bool]] = defaultdict(list)
        for i in range(len(requests)):
            rows[key(i)].append(nxt[i] is not None)
        return rows

    def gap_bucket(i: int) -> str:
        p = prev[i]
        if p is None:
            return "first turn"
        gap = seconds[i] - seconds[p]
        return next((f"< {edge} s" for edge in GAP_EDGES if gap < edge), f">= {GAP_EDGES[-1]} s")

    def size_bucket(i: int) -> str:
        n = len(requests[i].hash_ids)
        return next((f"< {edge} chunks" for edge in SIZE_EDGES if n < edge), f">= {SIZE_EDGES[-1]} chunks")

    share_table("by turn number (6 = 6 or more):", by(lambda i: min(turn[i], 6)), range(7))
    share_table("by seconds since the previous turn:", by(gap_bucket),
                ["first turn", *(f"< {e} s" for e in GAP_EDGES), f">= {GAP_EDGES[-1]} s"])
    share_table("by length:", by(size_bucket),
                [*(f"< {e} chunks" for e in SIZE_EDGES), f">= {SIZE_EDGES[-1]} chunks"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
