"""`kvtier demo`: a multi-turn chat, first without kvtier and then with it; TTFT per turn.

Workload: `conversations` chats of `turns` turns. Every chat starts with the same system
prompt; each turn's prompt is the whole history (system prompt, earlier messages and
replies) plus a new user message. Token ids are drawn from a seeded generator, so no
tokenizer is needed. The pass without kvtier records each greedy reply; the pass with kvtier
runs the very same prompts (so the columns compare like with like) and reports whether its
reply is the same. TTFT is the time from the call to generate() until its streamer receives
the first new token (lookup, loads, prefill and first-token sampling included).

The store is the embedded default: a DRAM tier plus a disk tier under `cache_dir`
(default: kvtier.core.config.default_cache_dir() / "demo", cleared at start because it is
the demo's own folder). A last line reopens the store with DRAM empty, as after a restart,
and reruns one prompt from the disk tier.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.common import print_table

SYSTEM_TOKENS = 512
USER_TOKENS = 64
REPLY_TOKENS = 16
CHUNK_TOKENS = 16


class _FirstTokenTimer:
    """A generate() streamer that notes when the first new token arrives (put #2; #1 is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass

    @property
    def ttft(self) -> float:
        return (self.first or time.perf_counter()) - self.start


def demo_model(model_path: str | None) -> tuple[Any, str]:
    if model_path:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.eval()
        n = sum(p.numel() for p in model.parameters())
        return model, f"{type(model).__name__} from {model_path} ({n / 1e6:.1f}M parameters, float32)"
    from kvtier.bench.models import random_llama

    model = random_llama(num_layers=4, hidden=384, heads=6, kv_heads=2, intermediate=1024, vocab=4096,
                         max_positions=8192, seed=0)
    n = sum(p.numel() for p in model.parameters())
    return model, (f"a small Llama-architecture model with RANDOM weights ({n / 1e6:.1f}M parameters, 4 layers, "
                   "float32); its replies are meaningless, its timings are real")


def _open_store(model: Any, root: Path) -> Any:
    from kvtier.connectors.transformers import model_layout
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore

    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, memory=MemoryTierConfig(capacity_bytes=512 << 20),
                      disk=DiskTierConfig(root=str(root), capacity_bytes=2 << 30))
    return TieredStore(cfg, model_layout(model))


def _script(vocab: int, turns: int, conversations: int) -> tuple[list[int], list[list[list[int]]]]:
    g = torch.Generator().manual_seed(1234)
    low = min(3, vocab - 1)

    def draw(n: int) -> list[int]:
        return torch.randint(low, vocab, (n,), generator=g).tolist()

    system = draw(SYSTEM_TOKENS)
    return system, [[draw(USER_TOKENS) for _ in range(turns)] for _ in range(conversations)]


def run_demo(model_path: str | None = None, cache_dir: str | None = None, turns: int = 4,
             conversations: int = 3) -> dict[str, Any]:
    from kvtier.connectors.transformers import TransformersConnector, kvtier_generate
    from kvtier.core import metrics as m
    from kvtier.core.config import default_cache_dir
    from kvtier.tiers.disk import clear_root

    if turns < 1 or conversations < 1:
        raise ValueError("turns and conversations must be at least 1")
    from kvtier.bench.ttft import pick_torch_threads

    threads, why = pick_torch_threads()
    torch.set_num_threads(threads)
    model, described = demo_model(model_path)
    print(f"model: {described}; {why}")
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "demo"
    if cache_dir is None and root.exists():
        clear_root(root)
    print(f"store: DRAM tier (512 MiB) + disk tier at {root}" + ("" if cache_dir else " (cleared at start)")
          + f"; {CHUNK_TOKENS}-token chunks")
    vocab = model.config.vocab_size
    system, messages = _script(vocab, turns, conversations)
    gen: dict[str, Any] = dict(max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS, do_sample=False,
               pad_token_id=0, eos_token_id=None)

    # Pass 1: plain transformers. Records the prompts and replies both passes use.
    prompts: list[list[list[int]]] = []
    replies: list[list[list[int]]] = []
    base_ttft: list[list[float]] = []
    for c in range(conversations):
        history = list(system)
        prompts.append([])
        replies.append([])
        base_ttft.append([])
        for t in range(turns):
            history += messages[c][t]
            ids = torch.tensor([history])
            timer = _FirstTokenTimer()
            with torch.no_grad():
                out = model.generate(ids, streamer=timer, **gen)
            base_ttft[c].append(timer.ttft)
            reply = out[0, ids.shape[1]:].tolist()
            prompts[c].append(list(history))
            replies[c].append(reply)
            history += reply

    # Pass 2: the same prompts with kvtier.
    store = _open_store(model, root)
    t0 = time.perf_counter()
    conn = TransformersConnector(model, store)
    fingerprint_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    table = []
    for c in range(conversations):
        for t in range(turns):
            ids = torch.tensor([prompts[c][t]])
            hit0 = conn.metrics.get(m.HIT_TOKENS, connector="transformers")
            timer = _FirstTokenTimer()
            out = kvtier_generate(model, ids, conn, streamer=timer, **gen)
            ttft = timer.ttft
            cached = int(conn.metrics.get(m.HIT_TOKENS, connector="transformers") - hit0)
            same = out[0, ids.shape[1]:].tolist() == replies[c][t]
            row = {"conversation": c + 1, "turn": t + 1, "prompt_tokens": ids.shape[1], "cached_tokens": cached,
                   "ttft_no_kvtier_s": base_ttft[c][t], "ttft_kvtier_s": ttft, "same_reply": same}
            rows.append(row)
            table.append([c + 1, t + 1, ids.shape[1], cached, f"{1000 * base_ttft[c][t]:.0f}", f"{1000 * ttft:.0f}",
                          f"{base_ttft[c][t] / ttft:.1f}x", "yes" if same else "no (near-tie)"])
    store.flush()
    hit = conn.metrics.get(m.HIT_TOKENS, connector="transformers")
    seen = conn.metrics.get(m.PREFILL_TOKENS, connector="transformers")
    store.close()

    # After a restart: DRAM empty, the disk tier still holds every chunk.
    store = _open_store(model, root)
    conn = TransformersConnector(model, store)
    ids = torch.tensor([prompts[-1][-1]])
    timer = _FirstTokenTimer()
    kvtier_generate(model, ids, conn, streamer=timer, **gen)
    restart = {"prompt_tokens": ids.shape[1], "ttft_s": timer.ttft,
               "cached_tokens": int(conn.metrics.get(m.HIT_TOKENS, connector="transformers")),
               "disk_chunks_read": int(store.metrics.get(m.HITS, tier="disk"))}
    store.close()

    print_table("TTFT per turn: plain transformers vs kvtier (same prompts)",
                ["conv", "turn", "prompt tok", "cached tok", "TTFT plain ms", "TTFT kvtier ms", "speed-up",
                 "same reply"], table)
    ratio = hit / seen if seen else 0.0
    total_base = sum(r["ttft_no_kvtier_s"] for r in rows)
    total_kv = sum(r["ttft_kvtier_s"] for r in rows)
    print(f"hit ratio: {ratio:.1%} of prompt tokens loaded from the store ({int(hit)} of {int(seen)}); "
          f"total TTFT {total_base:.2f} s -> {total_kv:.2f} s")
    print(f"after a restart (DRAM empty): a {restart['prompt_tokens']}-token prompt loaded "
          f"{restart['cached_tokens']} tokens from the disk tier ({restart['disk_chunks_read']} chunks); "
          f"TTFT {1000 * restart['ttft_s']:.0f} ms")
    print(f"(model fingerprint computed once in {fingerprint_s:.2f} s; turn 1 of a later conversation reuses the "
          "shared system prompt)")
    return {"model": described, "store_root": str(root), "chunk_tokens": CHUNK_TOKENS, "turns": rows,
            "hit_ratio": ratio, "total_ttft_no_kvtier_s": total_base, "total_ttft_kvtier_s": total_kv,
            "restart": restart}
