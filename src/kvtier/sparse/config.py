"""SparseConfig: the token budget of the fast tier and how it is split.

The fast tier of one layer holds `budget_tokens // block_tokens` block slots: one is the
tail (the block still being filled, always attended), the sink blocks and the recent
window's full blocks are always kept, and the remaining slots hold the blocks the policy
retrieves for the current query. A context that fits the slots is attended densely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvtier.sparse.errors import SparseConfigError


@dataclass(slots=True, frozen=True)
class SparseConfig:
    policy: str = "quest"
    budget_tokens: int = 4096
    block_tokens: int = 16  # must equal the store's chunk_tokens: one block is one stored chunk
    sink_tokens: int = 16
    window_tokens: int = 64  # recent full blocks kept besides the tail: ceil(window / block)
    retrieval_stride: int = 1  # re-score every N decode steps; in between only the window moves
    # a block already in fast memory stays picked while it ranks within the top (1 + keep_margin) x
    # retrieval_slots (its rank counts as rank / (1 + keep_margin)): fewer fetches per step, at the
    # cost of keeping a block that ranks a little below one it displaces. 0 = plain top-k.
    keep_margin: float = 0.0
    # chunked prefill (a forward of several tokens after the first): contexts up to this many tokens
    # are attended by one fused sdpa over the whole layer gathered from the store; longer ones are
    # streamed in pieces of this size (the memory a layer's prefill attention may hold at once)
    dense_stream_tokens: int = 65536
    # decode prefetch: per layer and KV head, this many blocks ranked just below the picks are read
    # ahead on a worker thread (and, on CUDA, copied on a side stream) for the next step; 0 = off
    prefetch_blocks: int = 0
    hash_bits: int = 64
    summary_seed: int = 0  # seeds the sign-hash projection (part of the stored summary's meaning)

    def __post_init__(self) -> None:
        for name in ("budget_tokens", "block_tokens", "retrieval_stride", "hash_bits", "dense_stream_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SparseConfigError(f"sparse.{name} must be a positive integer, got {value!r}")
        for name in ("sink_tokens", "window_tokens", "prefetch_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SparseConfigError(f"sparse.{name} must be an integer >= 0, got {value!r}")
        m = self.keep_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise SparseConfigError(f"sparse.keep_margin must be a finite number >= 0, got {m!r}")
        if self.hash_bits % 8:
            raise SparseConfigError(f"sparse.hash_bits must be a multiple of 8, got {self.hash_bits}")
        seed = self.summary_seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 63:
            raise SparseConfigError(f"sparse.summary_seed must be an integer in [0, 2**63), got {seed!r}")
        from kvtier.sparse.policies import POLICIES

        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise SparseConfigError(f"sparse.policy {self.policy!r} is unknown; choose one of {sorted(POLICIES)}")
        if self.budget_tokens % self.block_tokens:
            raise SparseConfigError(
                f"sparse.budget_tokens {self.budget_tokens} must be a whole number of "
                f"{self.block_tokens}-token blocks"
            )
        need = (self.sink_blocks + self.window_blocks + 1) * self.block_tokens
        if self.budget_tokens < need:
            raise SparseConfigError(
                f"sparse.budget_tokens {self.budget_tokens} is smaller than sinks + window + the tail block "
                f"({self.sink_blocks} + {self.window_blocks} + 1 blocks of {self.block_tokens} = {need} tokens)"
            )

    @property
    def sink_blocks(self) -> int:
        return -(-self.sink_tokens // self.block_tokens)

    @property
    def window_blocks(self) -> int:
        """The latest blocks always attended: at least one, the block holding the latest token when
        the tail is empty (with window_tokens 0 that block was a candidate the selection could drop:
        a token that did not attend to itself)."""
        return max(1, -(-self.window_tokens // self.block_tokens))

    @property
    def slots(self) -> int:
        """Full-block slots of one layer's working set (the tail has its own slot besides these)."""
        return self.budget_tokens // self.block_tokens - 1

    @property
    def retrieval_slots(self) -> int:
        return self.slots - self.sink_blocks - self.window_blocks
