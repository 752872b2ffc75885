"""The per-step plan the scheduler side sends to the worker side (inside vLLM's metadata).

Plain picklable data: chunk keys, where each chunk sits in vLLM's cache (group 0's block id and
the chunk's first token within that block) and lease ids. With chunk_tokens == block_size every
offset is 0 and every block id appears once; with smaller chunks a block holds several chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LoadSpec:
    """Load chunks `keys` into blocks `block_ids` at token `offsets` (all three the same length),
    before the layers that read them.

    The worker owns `lease_id` from here on and releases it once the load is done; until then
    the scheduler renews it (leases.py), however late the worker runs the step.
    """

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    offsets: list[int]
    lease_id: int | None


@dataclass(slots=True)
class SaveSpec:
    """Save the chunks at (`block_ids`, `offsets`) as the chain `keys`, whose first chunk follows
    `parent` at `first_depth`. `last_valid` > 0: the last chunk is a prompt's partial chunk of
    that many tokens (the rest of its rows are stored as zeros)."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    offsets: list[int]
    parent: bytes
    first_depth: int
    last_valid: int = 0
    # per chunk, its SECTION_BLOCK_HASHES payload (vLLM's block hash of the chunk's block and of
    # the block before it), stored beside the chunk so kvtier's KV events carry vLLM's hashes;
    # None where vLLM's hashes are not known (sub-block chunks, a partial chunk)
    block_hashes: list[bytes] | None = None


@dataclass(slots=True)
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # the tokens this step's forward computes (vLLM's scheduled tokens): the worker times forwards
    # without loads and reports (tokens, seconds), the load planner's compute cost
    computed_tokens: int = 0
    # how many steps with failed loads the scheduler had heard of when it built this plan: a
    # worker whose previous step's load failed knows from it whether this step was scheduled
    # before the rollback (async scheduling), and so may have computed over the failed blocks
    load_failures_seen: int = 0

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves)
