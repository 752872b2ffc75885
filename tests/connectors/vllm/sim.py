"""A tiny stand-in for vLLM's scheduler loop and paged CPU KV cache (no engine, no vllm import).

`Sim` owns a SchedulerSide and a WorkerSide sharing one in-process store, a block pool,
and per-layer CPU_ATTN-shaped caches [blocks, kv_heads, block, 2 * head_size]. "Computing"
a token writes values derived from the whole prefix into its slots, where vLLM 0.32's CPU
kernel ("vec") puts them: per head of a page, K transposed [D, block] then V [block, D].
A loaded block is right only if it holds exactly what computing would have written.
The store's chunk is BLOCK tokens; `block_size` may be a multiple of it (chunks < blocks).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.client.api import InProcessClient
from kvtier.connectors.vllm.fingerprint import lora_extras
from kvtier.connectors.vllm.link import StoreLink
from kvtier.connectors.vllm.plan import StepPlan
from kvtier.connectors.vllm.scheduler import SchedulerSide
from kvtier.connectors.vllm.worker import WorkerSide
from kvtier.core.config import MemoryTierConfig, StoreConfig
from kvtier.core.keys import Namespace
from kvtier.core.layout import KVLayout
from kvtier.store.tiered import TieredStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float32")
BLOCK = 4
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")


@dataclass(eq=False)
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int] | None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids or [])

    @property
    def all_token_ids(self) -> list[int]:
        return list(self.prompt_token_ids or []) + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)


@dataclass
class FakeLora:
    lora_name: str
    lora_int_id: int = 1
    lora_path: str = ""


def token_value(tokens: list[int], pos: int, layer: int) -> float:
    digest = hashlib.sha256(repr((tokens[: pos + 1], layer)).encode()).digest()
    return float(int.from_bytes(digest[:3], "little"))


def write_cpu_token(page: torch.Tensor, off: int, value: float) -> None:
    """Write one token's K and V (value + d, -(value + d) for d < D) into a CPU_ATTN page [H, N, 2D]."""
    heads, n, d = page.shape[0], page.shape[1], page.shape[2] // 2
    flat = page.view(heads, 2 * n * d)
    ramp = torch.arange(d, dtype=page.dtype)
    flat[:, off:n * d:n] = value + ramp  # K^T [D, N]: column `off`
    flat[:, n * d + off * d:n * d + (off + 1) * d] = -(value + ramp)  # V [N, D]: row `off`


def read_cpu_token(page: torch.Tensor, off: int) -> tuple[torch.Tensor, torch.Tensor]:
    heads, n, d = page.shape[0], page.shape[1], page.shape[2] // 2
    flat = page.reshape(heads, 2 * n * d)
    return flat[:, off:n * d:n], flat[:, n * d + off * d:n * d + (off + 1) * d]


def make_client(capacity_chunks: int = 64, lease_timeout_s: float = 30.0,
                clock: Callable[[], float] = time.monotonic) -> InProcessClient:
    cfg = StoreConfig(chunk_tokens=BLOCK, memory=MemoryTierConfig(capacity_bytes=capacity_chunks *
                                                                  LAYOUT.chunk_bytes(BLOCK)))
    return InProcessClient(TieredStore(cfg, LAYOUT), lease_timeout_s=lease_timeout_s, clock=clock)


def root_for(salt: str, lora: str) -> bytes:  # as the connector makes it
    return Namespace("test-model", LAYOUT.layout_id(BLOCK), 0, salt, "sha256", ("format=test", *lora_extras(lora))).root()


class Sim:
    def __init__(self, client: InProcessClient | None = None, num_blocks: int = 64, save_decode: bool = False,
                 block_size: int = BLOCK, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: the scheduler's (pass the client's fake clock to let leases lapse)."""
        self.client = client or make_client()
        self.link = StoreLink(lambda first: self.client, retry_after_s=0.0)
        self.block_size = block_size
        self.sched = SchedulerSide(self.link, root_for, BLOCK, "sha256", save_decode, block_size=block_size,
                                   clock=clock, lease_s=self.client.lease_timeout_s)
        self.worker = WorkerSide(self.link, LAYERS, LAYOUT, block_size, BLOCK)
        shape = (num_blocks, LAYOUT.num_kv_heads, block_size, 2 * LAYOUT.head_size)
        self.kv = {name: torch.zeros(shape) for name in LAYERS}
        self.worker.register(self.kv, "CPU_ATTN", num_blocks)
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is vLLM's null block
        self.blocks: dict[str, list[int]] = {}
        self.plans: list[StepPlan] = []
        self.failed: set[int] = set()

    # -- the scheduler's admission of a waiting request ----------------------------------
    def admit(self, req: FakeRequest, local_hit_tokens: int = 0, num_external: int | None = None) -> int:
        """get_num_new_matched_tokens + allocation + update_state_after_alloc; returns external tokens."""
        ext = self.sched.num_new_matched_tokens(req, local_hit_tokens)
        if num_external is not None:
            ext = num_external
        total = local_hit_tokens + ext
        need = -(-req.num_tokens // self.block_size)
        self.blocks[req.request_id] = [self.free.pop() for _ in range(need)]
        self.sched.after_alloc(req, self.blocks[req.request_id], ext)
        req.num_computed_tokens = total
        return ext

    def block_ids_of(self, req_id: str) -> list[int] | None:
        return self.blocks.get(req_id)

    # -- one engine step -----------------------------------------------------------------
    def step(self, scheduled: dict[FakeRequest, int], run_worker: bool = True) -> StepPlan:
        plan = self.sched.build_plan({r.request_id: n for r, n in scheduled.items()}, self.block_ids_of)
        self.plans.append(plan)
        if run_worker:
            self.run_worker(plan, scheduled)
        for r, n in scheduled.items():
            r.num_computed_tokens += n
        return plan

    def run_worker(self, plan: StepPlan, scheduled: dict[FakeRequest, int]) -> None:
        w = self.worker
        w.start_step(plan)
        w.start_loads()
        for layer, name in enumerate(LAYERS):
            w.wait_layer(name)
            for r, n in scheduled.items():  # the attention layer writes this step's K/V
                for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
                    self.write_token(r, pos, layer)
            w.save_layer(name)
        w.finish_step()
        self.failed |= w.take_failed_blocks()

    def write_token(self, r: FakeRequest, pos: int, layer: int) -> None:
        block = self.blocks[r.request_id][pos // self.block_size]
        write_cpu_token(self.kv[LAYERS[layer]][block], pos % self.block_size, token_value(r.all_token_ids, pos, layer))

    def tokens_are_right(self, r: FakeRequest, start: int, end: int) -> bool:
        """Every layer holds exactly the computed K and V of tokens [start, end) of `r`."""
        n = self.block_size
        for pos in range(start, end):
            for layer, name in enumerate(LAYERS):
                page = self.kv[name][self.blocks[r.request_id][pos // n]]
                want = torch.zeros_like(page)
                write_cpu_token(want, pos % n, token_value(r.all_token_ids, pos, layer))
                got_k, got_v = read_cpu_token(page, pos % n)
                want_k, want_v = read_cpu_token(want, pos % n)
                if not (torch.equal(got_k, want_k) and torch.equal(got_v, want_v)):
                    return False
        return True

    def finish(self, req: FakeRequest) -> None:
        self.sched.request_finished(req)
        self.free.extend(self.blocks.pop(req.request_id, []))

    def preempt(self, req: FakeRequest) -> None:
        self.free.extend(self.blocks.pop(req.request_id, []))
        req.num_computed_tokens = 0

    def expected_block(self, r: FakeRequest, chunk: int, layer: int) -> torch.Tensor:
        n = self.block_size
        page = torch.zeros(LAYOUT.num_kv_heads, n, 2 * LAYOUT.head_size)
        for off in range(n):
            write_cpu_token(page, off, token_value(r.all_token_ids, chunk * n + off, layer))
        return page

    def block_is_right(self, r: FakeRequest, chunk: int) -> bool:
        block = self.blocks[r.request_id][chunk]
        return all(torch.equal(self.kv[LAYERS[layer]][block], self.expected_block(r, chunk, layer))
                   for layer in range(len(LAYERS)))

    def leases(self) -> int:
        host = self.client._host
        assert host is not None
        return host.counts()["leases"]
