"""KVIndex: which blocks each instance holds, on which medium, learned from KV events.

    index.apply(instance, source, batch)  fold one decoded batch (kvtier.events.wire.KVEventBatch)
    index.clear(instance, source)         forget what one publisher told us (a restart, a lost gap)
    index.score(instance, hashes)         the weighted length of the longest cached prefix
    index.blocks(instance, medium)        the set of hashes held there (tests compare it exactly)
    index.prompt_hashes(tokens)           a prompt's block hashes, as the events' token_ids named them

An instance (one vLLM engine, the unit a request is routed to) may have several sources: vLLM's
own publisher (medium GPU) and kvtier's (CPU, STORAGE). Each source's view is kept apart, so an
AllBlocksCleared from one (vLLM resetting its prefix cache) does not wipe what the others said.

Hash settings: every source must hash blocks the way the router's callers do (same block size,
same hash algorithm and seed). A BlockStored with another block size, or one whose token_ids
re-hash (with `rehash`, when given) to another value, is dropped and counted, with one warning
per source: its hashes would never match a prompt's, and it would skew nothing but memory.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.events.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

_log = logging.getLogger(__name__)

BlockHash = int | bytes
MEDIUM_GPU = "GPU"
VLLM_SOURCE = "vllm"  # the source name of a vLLM instance's own stream (its GPU blocks, the connector's CPU ones)
DEFAULT_WEIGHTS = {MEDIUM_GPU: 1.0, "CPU": 0.8, "STORAGE": 0.5}
# rehash(parent_hash, token_ids_of_one_block) -> that block's hash under the router's setting
Rehash = Callable[[BlockHash | None, Sequence[int]], BlockHash]


@dataclass(slots=True)
class IndexStats:
    batches: int = 0
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    foreign_block_size: int = 0  # BlockStored events dropped: another block size
    foreign_hash: int = 0  # BlockStored events dropped: token_ids re-hash to another value


@dataclass(slots=True)
class _SourceView:
    # medium -> the hashes held, oldest stored first (an ordered set: O(1) to drop the oldest)
    by_medium: dict[str, OrderedDict[BlockHash, None]] = field(default_factory=dict)
    warned: bool = False


class KVIndex:
    def __init__(self, block_size: int, weights: dict[str, float] | None = None,
                 rehash: Rehash | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for medium, w in weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"weights[{medium!r}] must be a number >= 0, got {w!r}")
        self.block_size = block_size
        self.weights = weights
        self.rehash = rehash
        self.stats = IndexStats()
        self._views: dict[str, dict[str, _SourceView]] = {}  # instance -> source -> view
        self._churn: dict[str, int] = {}  # instance -> blocks it has stored, all media, all time
        # (parent, tokens) -> hash, least recently named or asked first
        self._named: OrderedDict[tuple[BlockHash | None, tuple[int, ...]], BlockHash] = OrderedDict()
        self.max_named = 1_000_000
        # per instance, source and medium: a source that never removes what it stored (the vLLM
        # connector's CPU blocks reach vLLM's stream stored only; their evictions are in the
        # service's stream) would otherwise grow without bound; the oldest stored go first, as the
        # store's own eviction would mostly take them
        self.max_blocks = 4_000_000

    # -- folding events -----------------------------------------------------------------
    def apply(self, instance: str, source: str, batch: KVEventBatch) -> None:
        view = self._view(instance, source)
        self.stats.batches += 1
        for event in batch.events:
            if isinstance(event, BlockStored):
                if self._foreign(instance, source, view, event):
                    continue
                held = view.by_medium.get(event.medium or MEDIUM_GPU)
                if held is None:
                    held = view.by_medium[event.medium or MEDIUM_GPU] = OrderedDict()
                for h in event.block_hashes:
                    held[h] = None
                    held.move_to_end(h)  # stored again: the newest
                while len(held) > self.max_blocks:
                    held.popitem(last=False)
                self._learn(event)
                self.stats.stored += len(event.block_hashes)
                self._churn[instance] = self._churn.get(instance, 0) + len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                holding = view.by_medium.get(event.medium or MEDIUM_GPU)
                if holding is not None:
                    for h in event.block_hashes:
                        holding.pop(h, None)
                self.stats.removed += len(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                if source == VLLM_SOURCE:  # vLLM resetting its prefix cache: its GPU blocks only; the
                    view.by_medium.pop(MEDIUM_GPU, None)  # connector's CPU blocks stay in the store
                else:
                    view.by_medium.clear()
                self.stats.cleared += 1

    def _learn(self, event: BlockStored) -> None:
        """Remember which hash each (parent hash, block tokens) got, from events that carry
        token_ids (vLLM's own, and the connector's take_events): prompt_hashes then names a
        prompt's blocks as the engines do, without the router re-implementing their hash."""
        tokens, bs = event.token_ids, self.block_size
        if not tokens or len(tokens) != len(event.block_hashes) * bs:
            return
        parent = event.parent_block_hash
        named = self._named
        for i, h in enumerate(event.block_hashes):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            named[key] = h
            named.move_to_end(key)
            if len(named) > self.max_named:
                # a bound on memory: the least recently used name goes (clearing them all lost hot
                # prefixes for good: vLLM names a block once, when it is cached)
                named.popitem(last=False)
            parent = h

    def prompt_hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        """The block hashes of the longest prefix of `tokens` whose blocks some event has named
        (parent by parent, from the first block); a block no event named ends it."""
        out: list[BlockHash] = []
        parent: BlockHash | None = None
        bs = self.block_size
        named = self._named
        for start in range(0, len(tokens) - bs + 1, bs):
            key = (parent, tuple(tokens[start:start + bs]))
            h = named.get(key)
            if h is None:
                break
            named.move_to_end(key)  # asked for: kept over names no prompt uses
            out.append(h)
            parent = h
        return out

    def _foreign(self, instance: str, source: str, view: _SourceView, event: BlockStored) -> bool:
        if event.block_size != self.block_size:
            self.stats.foreign_block_size += 1
            self._warn(instance, source, view, f"block_size {event.block_size}, the router's is {self.block_size}")
            return True
        tokens = event.token_ids
        if self.rehash is not None and tokens and len(tokens) == len(event.block_hashes) * self.block_size:
            parent = event.parent_block_hash
            for i, h in enumerate(event.block_hashes):
                mine = self.rehash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
                if mine != h:
                    self.stats.foreign_hash += 1
                    self._warn(instance, source, view,
                               "block hashes that its token_ids do not re-hash to (another hash algorithm or seed: "
                               "set the same --prefix-caching-hash-algo and PYTHONHASHSEED everywhere)")
                    return True
                parent = h
        return False

    @staticmethod
    def _warn(instance: str, source: str, view: _SourceView, what: str) -> None:
        if not view.warned:
            view.warned = True
            _log.warning("kv events from instance %s (source %s) carry %s; dropping them", instance, source, what)

    def clear(self, instance: str, source: str) -> None:
        self._view(instance, source).by_medium.clear()

    def _view(self, instance: str, source: str) -> _SourceView:
        return self._views.setdefault(instance, {}).setdefault(source, _SourceView())

    # -- questions --------------------------------------------------------------------------
    @property
    def instances(self) -> list[str]:
        return list(self._views)

    def churn(self, instance: str) -> int:
        """How many blocks `instance` has stored so far: its caches' write pressure. Of two
        instances that hold a prompt's prefix equally, the one that churns less keeps new blocks
        longer."""
        return self._churn.get(instance, 0)

    def blocks(self, instance: str, medium: str, source: str | None = None) -> set[BlockHash]:
        """Hashes `instance` holds on `medium` (from one source, or all)."""
        out: set[BlockHash] = set()
        for name, view in self._views.get(instance, {}).items():
            if source is None or name == source:
                out.update(view.by_medium.get(medium, ()))
        return out

    def score(self, instance: str, hashes: Sequence[BlockHash]) -> float:
        """Sum over the longest prefix of `hashes` the instance holds anywhere of each block's
        best medium weight; the first block it lacks everywhere ends the prefix."""
        views = [held for view in self._views.get(instance, {}).values() for held in view.by_medium.items()]
        if not views:
            return 0.0
        weights = self.weights
        total = 0.0
        for h in hashes:
            best = -1.0
            for medium, held in views:
                if h in held:
                    w = weights.get(medium, 0.0)
                    if w > best:
                        best = w
            if best < 0:
                break
            total += best
        return total
