"""Sparse-attention benchmark: retrieval accuracy, fidelity on stories260K, decode speed.

    run_sparse_bench(json_out, png_out=None, quick=False) -> dict    (`kvtier bench sparse`)

Also home of the synthetic multi-key recall task the retrieval model is trained on
(scripts/train_retrieval.py): `RetrievalTask`, `retrieval_batch`, `build_retrieval_model`,
`load_retrieval_model`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "sparse" / "data" / "retrieval"


# -- the multi-key recall task -------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class RetrievalTask:
    """Noise tokens with `needles` key-value needles; the last token asks for one key's value.

    A needle is one token naming (key, value), so one attention layer without positions can
    answer: the query token Q_k must find the needle with key k among the others and the noise.
    """

    keys: int = 16
    values: int = 16
    noise: int = 32
    needles: int = 8

    @property
    def needle_base(self) -> int:
        return self.noise

    @property
    def query_base(self) -> int:
        return self.noise + self.keys * self.values

    @property
    def answer_base(self) -> int:
        return self.query_base + self.keys

    @property
    def vocab(self) -> int:
        return self.answer_base + self.values


def retrieval_batch(task: RetrievalTask, batch: int, length: int, gen: torch.Generator,
                    needles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [batch, length], answer token [batch]); the query is the last input token.
    `needles` overrides the task's count (the training curriculum starts with one)."""
    n_needles = needles or task.needles
    ids = torch.randint(0, task.noise, (batch, length), generator=gen)
    answers = torch.empty(batch, dtype=torch.long)
    for i in range(batch):
        keys = torch.randperm(task.keys, generator=gen)[:n_needles]
        vals = torch.randint(0, task.values, (n_needles,), generator=gen)
        pos = torch.randperm(length - 1, generator=gen)[:n_needles]
        ids[i, pos] = task.needle_base + keys * task.values + vals
        j = int(torch.randint(0, n_needles, (1,), generator=gen))
        ids[i, -1] = task.query_base + keys[j]
        answers[i] = task.answer_base + vals[j]
    return ids, answers


def build_retrieval_model(task: RetrievalTask, seed: int = 0):
    """A stock 1-layer Llama (2 query heads sharing 1 KV head, 64 dims). rope_theta is huge, so
    most rotary pairs barely turn over thousands of tokens: content lookup survives length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=task.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=65536,
                      rope_theta=1e12,  # type: ignore[call-arg]  # transformers 5: kwargs -> rope_parameters
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def load_retrieval_model(path: str | Path | None = None):
    """(model, task, meta) from the committed checkpoint (or `path`)."""
    from transformers import LlamaForCausalLM

    p = Path(path or CHECKPOINT_DIR)
    meta = json.loads((p / "task.json").read_text())
    task = RetrievalTask(**meta["task"])
    model = LlamaForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
    return model, task, meta


def last_position_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of a 1-layer Llama, computing only what that position needs:
    every token's K and V, one query. Equals model(ids).logits[:, -1] (training is ~20x cheaper)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    if len(inner.layers) != 1:
        raise ValueError("last_position_logits is for the 1-layer retrieval model")
    layer = inner.layers[0]
    attn = layer.self_attn
    b, t = ids.shape
    x = inner.embed_tokens(ids[:, -1:])
    hd = attn.head_dim
    pos = torch.arange(t).unsqueeze(0)
    cos, sin = inner.rotary_emb(x, pos)
    # K and V before RoPE depend only on the token id: project the vocabulary once, then gather
    hv = layer.input_layernorm(inner.embed_tokens.weight)
    k = attn.k_proj(hv)[ids].view(b, t, -1, hd).transpose(1, 2)
    v = attn.v_proj(hv)[ids].view(b, t, -1, hd).transpose(1, 2)
    q = attn.q_proj(layer.input_layernorm(x)).view(b, 1, -1, hd).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), scale=attn.scaling)
    y = x + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
    y = y + layer.mlp(layer.post_attention_layernorm(y))
    return model.lm_head(inner.norm(y))[:, -1]


# -- helpers ---------------------------------------------------------------------------------
def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's full K and V from a dense transformers cache (all of this bench's layers are dense)."""
    keys, values = cache.layers[layer].keys, cache.layers[layer].values
    if keys is None or values is None:
        raise ValueError(f"layer {layer} of the dense cache holds no KV")
    return keys, values


def _store(layout, block_tokens: int, memory_bytes: int, disk_root: str | None = None):
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore

    disk = DiskTierConfig(root=disk_root, capacity_bytes=1 << 40) if disk_root else None
    cfg = StoreConfig(chunk_tokens=block_tokens, memory=MemoryTierConfig(capacity_bytes=memory_bytes,
                                                                          verify_reads=True), disk=disk)
    return TieredStore(cfg, layout)


def _sparse_config(policy: str, budget: int, block: int, sinks: int, window: int, stride: int = 1,
                   keep_margin: float = 0.0):
    from kvtier.sparse import SparseConfig

    return SparseConfig(policy=policy, budget_tokens=budget, block_tokens=block, sink_tokens=sinks,
                        window_tokens=window, retrieval_stride=stride, keep_margin=keep_margin)


# -- retrieval accuracy ----------------------------------------------------------------------
def accuracy(policies: Sequence[str], fractions: Sequence[float], contexts: Sequence[int], samples: int = 48,
             block_tokens: int = 16, seed: int = 7, model_dir: str | Path | None = None,
             stride: int = 1) -> list[dict[str, Any]]:
    """Recall accuracy of the retrieval model at budget = fraction x context, per policy.

    Each context's prompts are prefilled once (dense, stock sdpa) and their K/V appended to a
    fresh KVTierSparseCache per (policy, budget); the query token then decodes through
    attn_implementation="kvtier_sparse"."""
    from transformers import DynamicCache

    from kvtier.connectors.transformers.sparse import ATTN_NAME, KVTierSparseCache, register
    from kvtier.core.layout import KVLayout
    from kvtier.sparse import sparse_store_layout

    register()
    model, task, _ = load_retrieval_model(model_dir)
    cfg = model.config
    layout = KVLayout(1, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    rows = []
    for ctx in contexts:
        gen = torch.Generator().manual_seed(seed + ctx)
        ids, ans = retrieval_batch(task, samples, ctx, gen)
        with torch.no_grad():
            dense_acc = float((last_position_logits(model, ids).argmax(-1) == ans).float().mean())
            model.set_attn_implementation("sdpa")
            past = DynamicCache(config=cfg)
            model(ids[:, :-1], past_key_values=past, use_cache=True, logits_to_keep=1)
            k_all, v_all = _layer_kv(past, 0)
            model.set_attn_implementation(ATTN_NAME)
            for frac in fractions:
                budget = max(int(ctx * frac) // block_tokens * block_tokens, 4 * block_tokens)
                for policy in policies:
                    store = _store(sparse_store_layout(layout), block_tokens,
                                   samples * ctx * layout.token_bytes_per_layer() * 2)
                    cache = KVTierSparseCache(store, _sparse_config(policy, budget, block_tokens, block_tokens,
                                                                    block_tokens, stride), model_config=cfg)
                    cache.update(k_all, v_all, 0)
                    pos = torch.full((samples, 1), ctx - 1)
                    logits = model(ids[:, -1:], past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]
                    acc = float((logits.argmax(-1) == ans).float().mean())
                    cache.close()  # its writes and threads end before the store they write to
                    store.close()
                    rows.append({"policy": policy, "budget_tokens": budget, "context_tokens": ctx, "accuracy": acc,
                                 "dense_accuracy": dense_acc, "retrieval_stride": stride})
                    print(f"accuracy ctx {ctx:6d} budget {budget:5d} {policy:10s} stride {stride} {acc:.3f} "
                          f"(dense {dense_acc:.3f})", flush=True)
    return rows


# -- fidelity on stories260K -----------------------------------------------------------------
def fidelity(policies: Sequence[str], fractions: Sequence[float], context: int = 512, prompt: int = 64,
             block_tokens: int = 8, seed: int = 0, sinks: int = 8, window: int = 24,
             stride: int = 1, keep_margin: float = 0.0) -> list[dict[str, Any]]:
    """Top-1 agreement and KL(dense || sparse) of next-token distributions over text stories260K
    generates, decoding token by token with budget = fraction x context.

    8-token blocks: at a 1/8 budget of this 512-token context (64 tokens) 16-token blocks leave
    one retrieved block beside the sink, the window and the tail, so every policy (the oracle
    too) is mostly streaming; 8-token blocks leave three. Measured on seed 0, 16-token blocks
    with 16 sink + 16 window tokens: oracle top-1 0.989 / 0.904 at 1/4 / 1/8, quest_share
    0.973 / 0.891; 8-token blocks, 8 sink + 24 window tokens: oracle 0.991 / 0.944, quest_share
    0.991 / 0.942. The summaries then cost 2 x 8 floats per head per 8 tokens for Quest's bounds
    (stories260K's heads have 8 dims): 1/8 of the KV bytes."""
    import copy

    from kvtier.bench.models import load_stories260k
    from kvtier.connectors.transformers.sparse import ATTN_NAME, KVTierSparseCache, register
    from kvtier.core.layout import KVLayout
    from kvtier.sparse import sparse_store_layout

    register()
    dense = load_stories260k()
    dense.set_attn_implementation("sdpa")
    sparse = copy.deepcopy(dense)
    sparse.set_attn_implementation(ATTN_NAME)
    cfg = dense.config
    layout = KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads or cfg.num_attention_heads,
                      cfg.hidden_size // cfg.num_attention_heads)
    torch.manual_seed(seed)
    with torch.no_grad():
        # transformers types generate's self too narrowly for LlamaForCausalLM
        text = dense.generate(torch.tensor([[1]]), max_new_tokens=context - 1, do_sample=True,  # type: ignore[misc]
                              top_k=40, min_new_tokens=context - 1)
        ref = torch.log_softmax(dense(text).logits[0, prompt - 1 : context - 1].float(), -1)
    rows = []
    for frac in fractions:
        budget = int(context * frac) // block_tokens * block_tokens
        for policy in policies:
            store = _store(sparse_store_layout(layout), block_tokens, 64 << 20)
            cache = KVTierSparseCache(store, _sparse_config(policy, budget, block_tokens, sinks, window, stride,
                                                            keep_margin), model_config=cfg)
            outs = []
            with torch.no_grad():
                out = sparse(text[:, :prompt], past_key_values=cache, use_cache=True)
                outs.append(out.logits[0, -1])
                for t in range(prompt, context - 1):
                    outs.append(sparse(text[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
            got = torch.log_softmax(torch.stack(outs).float(), -1)
            top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
            kl = float((ref.exp() * (ref - got)).sum(-1).mean())
            # how far the selection moves per decode step on real text: blocks fetched per layer and step
            # (and the (block, head) slices read, each of which is one KV head's K and V of a block)
            steps = max(1, (context - 1 - prompt) * cfg.num_hidden_layers)
            fetched = sum(ws.fetched_blocks for seq in cache.sequences for ws in seq.working)
            slices = sum(ws.fetched_slices for seq in cache.sequences for ws in seq.working)
            cache.close()  # its writes and threads end before the store they write to
            store.close()
            rows.append({"policy": policy, "budget_fraction": frac, "top1_agreement": top1, "kl": kl,
                         "budget_tokens": budget, "block_tokens": block_tokens, "sink_tokens": sinks,
                         "window_tokens": window, "seed": seed, "retrieval_stride": stride,
                         "keep_margin": keep_margin, "fetched_blocks_per_layer_step": fetched / steps,
                         "fetched_slices_per_layer_step": slices / steps, "kv_heads": cfg.num_key_value_heads,
                         "budget_blocks": budget // block_tokens})
            print(f"fidelity budget {frac:.4g} ({budget} tokens) {policy:10s} stride {stride} margin {keep_margin} top1 {top1:.3f} "
                  f"kl {kl:.4f} fetched {fetched / steps:.2f} blocks ({slices / steps:.2f} block-head slices of "
                  f"{cfg.num_key_value_heads} heads) per layer and step (budget {budget // block_tokens})", flush=True)
    return rows


# -- decode speed ----------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class DecodeShape:
    layers: int = 12
    kv_heads: int = 8
    head_size: int = 128
    q_heads: int = 8
    hidden: int = 1024
    intermediate: int = 2816


def _layer_weights(shape: DecodeShape, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    s = shape
    out = []
    for _ in range(s.layers):
        def w(i: int, o: int) -> torch.Tensor:
            return torch.randn(o, i, generator=gen) * i**-0.5

        out.append({"q": w(s.hidden, s.q_heads * s.head_size), "k": w(s.hidden, s.kv_heads * s.head_size),
                    "v": w(s.hidden, s.kv_heads * s.head_size), "o": w(s.q_heads * s.head_size, s.hidden),
                    "gate": w(s.hidden, s.intermediate), "up": w(s.hidden, s.intermediate),
                    "down": w(s.intermediate, s.hidden)})
    return out


def decode_speed(contexts: Sequence[int], budget: int = 4096, block_tokens: int = 64, steps: int = 4,
                 shape: DecodeShape | None = None, memory_bytes: int = 3 << 30, policy: str = "quest",
                 seed: int = 0, stride: int = 1, drift: float = 0.0, keep_margin: float = 0.0) -> list[dict[str, Any]]:
    """Per-token decode time of a synthetic model (random weights and KV of `shape`), dense against
    sparse. Dense reads a preallocated contiguous KV; sparse keeps the KV in a TieredStore (DRAM
    tier of `memory_bytes`, the rest on a temporary disk tier). Both attend with the same kernel
    (kvtier.sparse.kv.masked_attention); sparse's timed part also selects (summary scan), fetches
    the changed blocks from the store and appends the step's token. Times are medians over `steps`.

    Each step's input is the previous step's output (the model's last hidden state, fed back as
    autoregressive decoding feeds the sampled token), so queries move from step to step and the
    working set fetches what the new selection needs: `fetched_slices_per_step` counts the
    (block, KV head) slices read from the store, `fetched_bytes_per_step` their bytes, and
    `fetched_blocks_per_step` the distinct blocks among them (all over all layers; `budget_blocks`
    is the most one layer holds per head). `sparse_*_repeated_input_ms` rerun the same input every
    step (the selection barely moves: the fewest fetches) for contrast. Random KV has no structure,
    so a moved query reselects much of the budget: a real model's selection moves less (see the
    fidelity rows' fetched_blocks_per_layer_step). `stride` > 1 re-scores every `stride` steps
    (SparseConfig.retrieval_stride); its accuracy cost is measured by `fidelity(..., stride=)`
    and `accuracy(..., stride=)`, not here (random KV has no right answer).

    `drift` in [0, 1) keeps part of the previous step's input: the next input is
    drift * x_in + sqrt(1 - drift**2) * x_out, renormalized (0 feeds the output back as it is).
    Random weights make consecutive queries nearly unrelated, so the selection churns far more
    than on real text; a drift makes them correlated, and `retrieval_churn` (the share of the
    retrieved (block, head) picks fetched anew per step) says how much the selection moved, to
    set beside the churn of a real model's attention (fidelity rows). `keep_margin` is
    SparseConfig.keep_margin (held blocks stay while they rank within (1 + margin) x the picks);
    its accuracy cost is measured by `fidelity(..., keep_margin=)`. `sparse_fetch_ms` is the part
    of `sparse_attn_ms` spent reading slices from the store; set `fetch_us_per_slice` beside
    `idle_memory_probe()`'s numbers."""
    import torch.nn.functional as F

    from kvtier.bench.common import median
    from kvtier.core.layout import KVLayout
    from kvtier.sparse import SparseKV, sparse_store_layout
    from kvtier.sparse.kv import masked_attention

    s = shape or DecodeShape()
    gen = torch.Generator().manual_seed(seed)
    weights = _layer_weights(s, gen)
    layout = KVLayout(s.layers, s.kv_heads, s.head_size)
    g = s.q_heads // s.kv_heads
    scale = s.head_size**-0.5
    rows = []

    def rest_of_layer(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = (x @ w["q"].T).view(s.q_heads, 1, s.head_size)
        k = (x @ w["k"].T).view(s.kv_heads, 1, s.head_size)
        v = (x @ w["v"].T).view(s.kv_heads, 1, s.head_size)
        return q, k, v

    def mlp(w: dict[str, torch.Tensor], x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + attn.reshape(1, -1) @ w["o"].T
        h = F.silu(x @ w["gate"].T) * (x @ w["up"].T)
        y = x + h @ w["down"].T
        return y / y.norm() * s.hidden**0.5

    if not 0.0 <= drift < 1.0:
        raise ValueError(f"drift must be in [0, 1), got {drift!r}")
    keep, fresh = drift, (1.0 - drift * drift) ** 0.5

    def next_input(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        if not drift:
            return x_out
        x = keep * x_in + fresh * x_out
        return x / x.norm() * s.hidden**0.5

    def sparse_steps(kv: Any, x0: torch.Tensor, feedback: bool) -> tuple[list[float], list[float], list[tuple[float, ...]]]:
        """Timed sparse decode steps: attention s, token s, and (blocks, slices, bytes, seconds) fetched, per step."""
        attn_t, tok_t, fetched = [], [], []
        x_in = x0

        def counts() -> tuple[float, ...]:
            return (sum(ws.fetched_blocks for ws in kv.working), sum(ws.fetched_slices for ws in kv.working),
                    kv.fetched_bytes, kv.fetch_seconds)

        for _ in range(steps + 1):
            x = x_in
            a = 0.0
            before = counts()
            t_tok = time.perf_counter()
            for layer in range(s.layers):
                q, k, v = rest_of_layer(weights[layer], x)
                t0 = time.perf_counter()
                kv.append(layer, k, v)
                out = kv.attend(layer, q, scale)
                a += time.perf_counter() - t0
                x = mlp(weights[layer], x, out)
            tok_t.append(time.perf_counter() - t_tok)
            attn_t.append(a)
            fetched.append(tuple(n - b for n, b in zip(counts(), before)))
            x_in = next_input(x_in, x) if feedback else x0
        return attn_t, tok_t, fetched


    for ctx in contexts:
        # dense: one contiguous KV per layer, written in place each step
        cap = ctx + steps + 2
        kd = torch.empty(s.layers, s.kv_heads, cap, s.head_size)
        vd = torch.empty_like(kd)
        for layer in range(s.layers):
            kd[layer, :, :ctx].normal_(generator=gen)
            vd[layer, :, :ctx].normal_(generator=gen)
        x0 = torch.randn(1, s.hidden, generator=gen)
        attn_t, tok_t = [], []
        t = ctx
        x_in = x0
        for _ in range(steps + 1):
            x = x_in
            a = 0.0
            t_tok = time.perf_counter()
            for layer in range(s.layers):
                q, k, v = rest_of_layer(weights[layer], x)
                t0 = time.perf_counter()
                kd[layer, :, t] = k[:, 0]
                vd[layer, :, t] = v[:, 0]
                out = masked_attention(q.view(s.kv_heads, g, s.head_size), kd[layer, :, : t + 1],
                                       vd[layer, :, : t + 1], None, scale)
                a += time.perf_counter() - t0
                x = mlp(weights[layer], x, out)
            tok_t.append(time.perf_counter() - t_tok)
            attn_t.append(a)
            x_in = next_input(x_in, x)  # fed back
            t += 1
        del kd, vd
        dense_attn, dense_tok = median(attn_t[1:]), median(tok_t[1:])
        # sparse: the KV written straight into the store
        with tempfile.TemporaryDirectory(prefix="kvtier-sparse-bench-") as tmp:
            store = _store(sparse_store_layout(layout), block_tokens, memory_bytes, tmp)
            kv = SparseKV(store, _sparse_config(policy, budget, block_tokens, block_tokens, 2 * block_tokens, stride,
                                                keep_margin), layout)
            t_w = time.perf_counter()
            span = 4096
            for lo in range(0, ctx, span):
                n = min(span, ctx - lo)
                for layer in range(s.layers):
                    kv.append(layer, torch.randn(s.kv_heads, n, s.head_size, generator=gen),
                              torch.randn(s.kv_heads, n, s.head_size, generator=gen))
                kv.flush()
            write_s = time.perf_counter() - t_w

            attn_t, tok_t, fetched = sparse_steps(kv, x0, feedback=True)
            rep_attn, rep_tok, rep_fetched = sparse_steps(kv, x0, feedback=False)
            stats = store.stats()
            picks = kv.config.retrieval_slots * s.kv_heads * s.layers
            # blocks, slices, bytes and seconds fetched per step, the first (warm-up) step left out as above
            blocks, slices, nbytes, seconds = zip(*fetched[1:])
            rep_blocks, rep_slices, _, _ = zip(*rep_fetched[1:])
            row = {"context_tokens": ctx, "budget_tokens": budget, "block_tokens": block_tokens,
                   "dense_attn_ms": 1e3 * dense_attn, "sparse_attn_ms": 1e3 * median(attn_t[1:]),
                   "dense_token_ms": 1e3 * dense_tok, "sparse_token_ms": 1e3 * median(tok_t[1:]),
                   "fetched_blocks_per_step": median(blocks),
                   "fetched_slices_per_step": median(slices),
                   "fetched_bytes_per_step": median(nbytes),
                   "budget_blocks": budget // block_tokens, "layers": s.layers, "kv_heads": s.kv_heads,
                   "retrieval_stride": stride, "query_drift": drift, "keep_margin": keep_margin,
                   "retrieval_churn": median(slices) / picks,
                   # the part of sparse_attn_ms spent reading slices from the store (checksums included)
                   "sparse_fetch_ms": 1e3 * median(seconds),
                   "fetch_us_per_slice": 1e6 * sum(seconds) / max(1, sum(slices)),
                   # with retrieval_stride > 1 only every stride-th step re-scores and refetches: the
                   # median hides that step, the mean over the timed steps amortizes it
                   "sparse_attn_mean_ms": 1e3 * sum(attn_t[1:]) / steps, "sparse_token_mean_ms": 1e3 * sum(tok_t[1:]) / steps,
                   "sparse_attn_steps_ms": [1e3 * a for a in attn_t[1:]],
                   "sparse_attn_repeated_input_ms": 1e3 * median(rep_attn[1:]),
                   "sparse_token_repeated_input_ms": 1e3 * median(rep_tok[1:]),
                   "fetched_blocks_per_step_repeated_input": median(rep_blocks),
                   "fetched_slices_per_step_repeated_input": median(rep_slices),
                   "fast_tier_bytes": kv.fast_tier_bytes(), "budget_kv_bytes": kv.budget_bytes(),
                   "summary_bytes": kv.summary_bytes(), "policy": policy,
                   "first_step_ms": 1e3 * tok_t[0], "write_s": write_s,
                   "store_kv_bytes": ctx * layout.token_bytes_per_layer() * s.layers,
                   "dram_bytes": stats["memory"]["used_bytes"], "disk_bytes": stats["disk"]["used_bytes"]}
            kv.close()  # its writes and threads end before the store they write to
            store.close()
        rows.append(row)
        print(f"decode ctx {ctx:6d} B {block_tokens} {policy} stride {stride}: attn dense {row['dense_attn_ms']:.1f} ms sparse "
              f"{row['sparse_attn_ms']:.1f} ms ({row['dense_attn_ms'] / row['sparse_attn_ms']:.1f}x), token dense "
              f"{row['dense_token_ms']:.1f} sparse {row['sparse_token_ms']:.1f} "
              f"({row['dense_token_ms'] / row['sparse_token_ms']:.1f}x), fast {row['fast_tier_bytes'] / 2**20:.0f} MiB "
              f"(budget KV {row['budget_kv_bytes'] / 2**20:.0f} + summaries {row['summary_bytes'] / 2**20:.1f}); "
              f"{row['fetched_slices_per_step']:.0f} block-head slices ({row['fetched_bytes_per_step'] / 2**20:.0f} MiB, "
              f"{row['fetched_blocks_per_step']:.0f} distinct blocks) fetched per step over {s.layers} layers, "
              f"in {row['sparse_fetch_ms']:.1f} ms ({row['fetch_us_per_slice']:.1f} us a slice), "
              f"churn {row['retrieval_churn']:.2f} at drift {drift} keep margin {keep_margin} "
              f"(budget {row['budget_blocks']} blocks a layer and head); same input every step: attn "
              f"{row['sparse_attn_repeated_input_ms']:.1f} ms "
              f"({row['dense_attn_ms'] / row['sparse_attn_repeated_input_ms']:.1f}x), "
              f"{row['fetched_slices_per_step_repeated_input']:.0f} slices fetched", flush=True)
    return rows


# -- the machine ----------------------------------------------------------------------------
def idle_memory_probe(idle_s: Sequence[float] = (0.0, 1.0, 4.0), section_bytes: int = 32 << 10,
                      pool_bytes: int = 1 << 30, sections: int = 400, seed: int = 0) -> list[dict[str, float]]:
    """What this machine charges to read memory that sat untouched for a while, the way sparse decode
    reads its store: for each idle time, every page of a `pool_bytes` pool is written, the process
    waits `idle` seconds, then `sections` scattered sections (each in its own 2 MiB region) are copied
    into a warm buffer. Returns one row per idle time: microseconds per section and GB/s.

    On ordinary hardware the idle time changes nothing. On the VM this project is measured on, a
    32 KiB section cost 7-16 us just after its page was written, 50-130 us after 1 s and 80-150 us
    after 3-4 s, whether the CPU slept or worked meanwhile, with or without transparent huge pages
    (the host's memory management, out of the guest's reach: mlock does not change it). Dense attention reads all of its KV every step and
    never pays it; sparse decode reads each block of the store only every few steps, so its fetches
    do: set `fetch_us_per_slice` of the decode rows beside these numbers."""
    import ctypes

    import numpy as np

    region = 2 << 20
    if pool_bytes < region or section_bytes > region:
        raise ValueError(f"pool_bytes must hold a 2 MiB region and sections fit in one, got {pool_bytes}, {section_bytes}")
    n = min(sections, pool_bytes // region)
    pool = np.ones(pool_bytes, dtype=np.uint8)
    dest = np.ones(n * section_bytes, dtype=np.uint8)
    src, dst = pool.ctypes.data, dest.ctypes.data
    rng = np.random.default_rng(seed)
    rows = []
    for idle in idle_s:
        pool[::4096] += 1  # write every page
        dest[:] = 0
        time.sleep(idle)
        offsets = (rng.choice(pool_bytes // region, n, replace=False) * region
                   + rng.integers(0, region // section_bytes, n) * section_bytes).tolist()
        t = time.perf_counter()
        for i, off in enumerate(offsets):
            ctypes.memmove(dst + i * section_bytes, src + off, section_bytes)
        dt = time.perf_counter() - t
        last = offsets[-1]
        if not np.array_equal(dest[(n - 1) * section_bytes :], pool[last : last + section_bytes]):
            raise RuntimeError("idle_memory_probe: a copied section differs from its source")
        rows.append({"idle_s": float(idle), "section_bytes": section_bytes, "sections": n,
                     "us_per_section": 1e6 * dt / n, "gb_per_s": n * section_bytes / dt / 1e9})
    return rows


# -- the whole run ---------------------------------------------------------------------------
ACCURACY_POLICIES = ("streaming", "quest", "mean", "hash", "quest_mean", "quest_share", "oracle")


def plot_accuracy(rows: list[dict[str, Any]], png_out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        sub = [r for r in rows if r["context_tokens"] == ctx]
        for policy in dict.fromkeys(r["policy"] for r in sub):
            pts = sorted((r["budget_tokens"], r["accuracy"]) for r in sub if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.axhline(sub[0]["dense_accuracy"], color="black", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {ctx} tokens")
        ax.set_xlabel("budget (tokens)")
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(png_out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_out, dpi=100)
    plt.close(fig)
    print(f"wrote {png_out}")


def run_sparse_bench(json_out: str | Path | None, png_out: str | Path | None = None, quick: bool = False,
                     decode_contexts: Sequence[int] | None = None, device: str | None = None,
                     shape: str | None = None, dtype: str | None = None,
                     prefetch_blocks: int | None = None) -> dict[str, Any]:
    """Accuracy (retrieval model), fidelity (stories260K, skipped without its weights) and decode speed.

    quick: fewer samples, shorter contexts (minutes). Runs single-threaded torch (restored after):
    on a shared CPU, OpenMP threads waiting on each other cost more than they bring.

    With `device` (cpu or cuda; `shape` and `dtype` then default to tiny/float32 on the CPU and
    llama-8b/bfloat16 on CUDA) it runs instead the rows of a random Llama decoding on that device
    through the transformers connector (bench/sparse_device.py: `setup`, `gpu_decode`, `prefill`,
    `max_context`, `batched`); the CPU rows above are what runs without it."""
    from kvtier.bench.common import write_json
    from kvtier.bench.models import stories_available

    if device is not None or shape is not None or dtype is not None or prefetch_blocks is not None:
        from kvtier.bench.sparse_device import device_rows

        t_dev = time.perf_counter()
        threads = torch.get_num_threads()
        if (device or "cpu") == "cpu":
            torch.set_num_threads(1)  # as the CPU rows below: a shared CPU's OpenMP threads stall each other
        try:
            rows = device_rows(device or "cpu", shape, dtype, quick, prefetch_blocks,
                               on_row=lambda partial: write_json(json_out, {**partial, "meta": {"partial": True}}))
        finally:
            torch.set_num_threads(threads)
        rows["meta"] = {"quick": quick, "seconds": round(time.perf_counter() - t_dev, 1),
                        "cpu_rows": "accuracy, fidelity and decode run without --device/--shape/--dtype"}
        write_json(json_out, rows)
        return rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        out: dict[str, Any] = {"accuracy": [], "fidelity": [], "decode": []}
        meta: dict[str, Any] = {"quick": quick}
        if (CHECKPOINT_DIR / "task.json").is_file():
            contexts = (2048, 4096) if quick else (2048, 4096, 8192)
            fractions = (1 / 8, 1 / 16) if quick else (1 / 4, 1 / 8, 1 / 16, 1 / 32)
            out["accuracy"] = accuracy(ACCURACY_POLICIES, fractions, contexts, samples=24 if quick else 64)
        else:
            meta["accuracy_skipped"] = f"no retrieval checkpoint at {CHECKPOINT_DIR}; run scripts/train_retrieval.py"
        if stories_available():
            policies = ("streaming", "quest", "quest_share", "hash", "oracle") if quick else ACCURACY_POLICIES
            out["fidelity"] = fidelity(policies, (1 / 4, 1 / 8), context=512)
            # what keeping held blocks costs in fidelity, beside the fetches it saves on real text
            out["fidelity"] += fidelity(("quest", "quest_share"), (1 / 4, 1 / 8), context=512, keep_margin=0.5)
        else:
            meta["fidelity_skipped"] = "stories260K weights not found"
        ctxs = decode_contexts or ((4096, 16384) if quick else (4096, 16384, 40960, 65536))
        out["decode"] = decode_speed(ctxs, budget=1024 if quick else 4096, block_tokens=64, steps=3 if quick else 4)
        if not quick:
            # queries that drift like real text's (about a quarter of the picks change per step), with and
            # without keeping held blocks
            for margin in (0.0, 0.5):
                out["decode"] += decode_speed([max(ctxs)], budget=4096, block_tokens=64, steps=4, drift=0.98,
                                              keep_margin=margin)
        meta["idle_memory"] = idle_memory_probe((0.0, 1.0) if quick else (0.0, 1.0, 4.0),
                                                pool_bytes=(256 << 20) if quick else (1 << 30))
        for r in meta["idle_memory"]:
            print(f"memory idle {r['idle_s']:.0f} s: {r['us_per_section']:.1f} us per scattered "
                  f"{r['section_bytes'] >> 10} KiB section", flush=True)
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        meta["torch_threads"] = 1
        out["meta"] = meta
        write_json(json_out, out)
        if png_out and out["accuracy"]:
            plot_accuracy(out["accuracy"], png_out)
        return out
    finally:
        torch.set_num_threads(threads)

