"""`kvtier demo`: chats over one long shared document, with and without kvtier; TTFT per turn.

Workload: a shared document (a system prompt or a manual, `doc_tokens` long, the same for
every chat) and `conversations` chats of `turns` turns each. A turn's prompt is the document,
the chat's earlier questions and replies, and a new question; so from the second chat on the
document is stored, and from the second turn on the chat's history is too. Token ids come from
a seeded generator (no tokenizer needed); the replies are the plain model's greedy replies,
and both sides run exactly the same prompts.

Timing: TTFT is the time from the prompt to the first new token: one forward over the prompt
(kvtier: lookup, load of the stored prefix, forward over the rest, staging its chunks for
the store) and the argmax of the last position's logits. Both sides are warmed up first
(model and store code paths, a miss and a hit), and both run `repeats` times in alternating
order; each repeat replays the whole workload against a freshly cleared store, so every
kvtier repeat of a row finds exactly what the workload stored before it. After each kvtier
prompt the store's background disk writes are waited for, untimed, so they never run
during the plain side's timing. The table shows medians.

Correctness: on the first repeat both sides also decode `reply_tokens` greedy tokens from
their own caches. Where the replies differ, the demo looks at the first step where they do:
the plain model's lead of its token over kvtier's (its top-1/top-2 gap when kvtier picked
its runner-up) and the largest difference between the two sides' logits there. It reports
"near-tie" only when that lead is within twice the difference and the difference is float32
noise (below 1e-3 of the logits' scale); anything else is printed as a mismatch.

The store is the embedded default: a DRAM tier plus a disk tier under `cache_dir` (default:
kvtier.core.config.default_cache_dir() / "demo"; its run folder is cleared before each repeat,
as it is the demo's own). A last line reopens the store with DRAM empty, as after a restart,
and reruns the last prompt from the disk tier. Results go to a JSON file and a PNG plot.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.common import print_table, write_json
from kvtier.core.errors import ConfigError

CHUNK_TOKENS = 16
NOISE_SCALE = 1e-3  # logit differences below this fraction of the logits' scale are float32 noise
MOSTLY_CACHED = 0.5  # rows whose prompt is more than half stored must be faster with kvtier


@dataclass(frozen=True, slots=True)
class DemoParams:
    """The workload's shape; `quick` is a seconds-long version for tests."""

    doc_tokens: int = 3072
    question_tokens: int = 48
    reply_tokens: int = 24
    turns: int = 3
    conversations: int = 2
    repeats: int = 3


QUICK = DemoParams(doc_tokens=256, question_tokens=16, reply_tokens=4, turns=2, conversations=2, repeats=1)


def demo_params(quick: bool = False, *, turns: int | None = None, conversations: int | None = None,
                repeats: int | None = None, doc_tokens: int | None = None) -> DemoParams:
    """The workload: QUICK's sizes with `quick`, else DemoParams'; a size given (not None) wins
    either way, so `--quick --turns 4` is the quick workload with four turns. A given size out of
    range is a ConfigError naming it."""
    given = {"turns": turns, "conversations": conversations, "repeats": repeats, "doc_tokens": doc_tokens}
    least = {"turns": 1, "conversations": 1, "repeats": 1, "doc_tokens": CHUNK_TOKENS}
    for name, value in given.items():
        if value is not None and value < least[name]:
            unit = " (one chunk)" if name == "doc_tokens" else ""
            raise ConfigError(f"{name} must be at least {least[name]}{unit}, got {value}")
    base = QUICK if quick else DemoParams()
    return replace(base, **{name: value for name, value in given.items() if value is not None})


def demo_model(model_path: str | None, quick: bool = False) -> tuple[Any, str]:
    if model_path:
        from transformers import AutoModelForCausalLM

        try:
            model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        except (OSError, ValueError) as e:  # not a folder, or not a causal LM's: one line, not a traceback
            raise ConfigError(f"--model {model_path!r}: not a transformers causal language model ({e})") from None
        model.eval()
        n = sum(p.numel() for p in model.parameters())
        return model, f"{type(model).__name__} from {model_path} ({n / 1e6:.1f}M parameters, float32)"
    from kvtier.bench.models import random_llama

    layers, hidden = (2, 64) if quick else (4, 256)
    model = random_llama(num_layers=layers, hidden=hidden, heads=4, kv_heads=2, intermediate=3 * hidden,
                         vocab=4096, max_positions=8192, seed=0)
    n = sum(p.numel() for p in model.parameters())
    return model, (f"a small Llama-architecture model with RANDOM weights ({n / 1e6:.1f}M parameters, {layers} "
                   "layers, float32); its replies are meaningless, its timings are real")


def _open_store(model: Any, root: Path) -> Any:
    from kvtier.connectors.transformers import model_layout
    from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore

    cfg = StoreConfig(chunk_tokens=CHUNK_TOKENS, memory=MemoryTierConfig(capacity_bytes=512 << 20),
                      disk=DiskTierConfig(root=str(root), capacity_bytes=2 << 30))
    return TieredStore(cfg, model_layout(model))


def _fresh_store(model: Any, root: Path) -> Any:
    from kvtier.tiers.disk import clear_root

    if root.exists():
        clear_root(root)
    return _open_store(model, root)


@dataclass(slots=True)
class _Script:
    """The workload's token ids: the document, each chat's questions, and (filled by the first
    repeat) each turn's reply, which becomes part of the next turn's prompt."""

    doc: list[int]
    questions: list[list[list[int]]]
    replies: list[list[list[int]]]

    @classmethod
    def draw(cls, vocab: int, params: DemoParams) -> _Script:
        g = torch.Generator().manual_seed(1234)
        low = min(3, vocab - 1)

        def draw(n: int) -> list[int]:
            return torch.randint(low, vocab, (n,), generator=g).tolist()

        doc = draw(params.doc_tokens)
        questions = [[draw(params.question_tokens) for _ in range(params.turns)] for _ in range(params.conversations)]
        return cls(doc, questions, [[] for _ in range(params.conversations)])

    def prompt(self, c: int, t: int) -> list[int]:
        out = list(self.doc)
        for earlier in range(t):
            out += self.questions[c][earlier] + self.replies[c][earlier]
        return out + self.questions[c][t]


def _plain_first_token(model: Any, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[0, -1]


def _kvtier_first_token(conn: Any, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    cache, out = conn.prefill(ids, logits_to_keep=1)
    return cache, out.logits[0, -1]


def _decode(model: Any, cache_kwargs: dict[str, Any], first_logits: torch.Tensor, prompt_len: int,
            steps: int) -> list[torch.Tensor]:
    """Greedy decode from a filled cache; the logits of every step (the first one given)."""
    logits = [first_logits]
    with torch.no_grad():
        for i in range(steps - 1):
            token = logits[-1].argmax().view(1, 1)
            out = model(token, use_cache=True, logits_to_keep=1, cache_position=torch.tensor([prompt_len + i], device=token.device),
                        **cache_kwargs)
            logits.append(out.logits[0, -1])
    return logits


def compare_replies(plain: list[torch.Tensor], kvtier: list[torch.Tensor]) -> dict[str, Any]:
    """Whether two greedy decodes agree and, at the first step where they do not, how close it was.

    `plain` and `kvtier` are the logits of each step (the same contexts up to the first
    difference). `lead` is the plain logits' margin of plain's token over kvtier's (plain's
    top-1/top-2 gap when kvtier picked the runner-up); `difference` the largest absolute
    difference between the two sides' logits at that step. A near-tie is a lead within twice
    the difference where the difference is float32 noise (below NOISE_SCALE of the logits' scale)."""
    first_diff = max(float((p - k).abs().max()) for p, k in zip(plain[:1], kvtier[:1], strict=True))
    for step, (p, k) in enumerate(zip(plain, kvtier, strict=True)):
        a, b = int(p.argmax()), int(k.argmax())
        if a == b:
            continue
        lead = float(p[a] - p[b])
        difference = float((p - k).abs().max())
        scale = float(p.abs().max())
        near_tie = lead <= 2 * difference and difference <= NOISE_SCALE * max(scale, 1.0)
        return {"same_reply": False, "near_tie": near_tie, "step": step, "lead": lead, "difference": difference,
                "logit_scale": scale, "first_token_logit_difference": first_diff}
    return {"same_reply": True, "near_tie": False, "first_token_logit_difference": first_diff}


def _verdict(check: dict[str, Any]) -> str:
    if check["same_reply"]:
        return "yes"
    if check["near_tie"]:
        return f"near-tie (lead {check['lead']:.1e} <= 2x logit diff {check['difference']:.1e})"
    return f"NO: step {check['step']}, lead {check['lead']:.2g}, logit diff {check['difference']:.2g}"


def _warm_up(model: Any, conn_factory: Any, root: Path, vocab: int, tokens: int) -> None:
    """Run both paths before timing: the plain forward, and kvtier's miss and hit, on a prompt
    of the document's length that the workload never uses."""
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(min(3, vocab - 1), vocab, (1, tokens), generator=g).to(model.device)
    _plain_first_token(model, ids)
    store = _fresh_store(model, root)
    try:
        conn = conn_factory(store)
        _kvtier_first_token(conn, ids)  # a miss: computes and saves
        store.flush()
        _kvtier_first_token(conn, ids)  # a hit: loads
    finally:
        store.close()


def _plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot written to {path}: matplotlib is not installed (pip install 'kvtier[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"c{r['conversation']} t{r['turn']}\n{r['cached_tokens']}/{r['prompt_tokens']}" for r in rows]
    x = range(len(rows))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    plain = [1000 * r["ttft_no_kvtier_s"] for r in rows]
    kv = [1000 * r["ttft_kvtier_s"] for r in rows]
    ax.bar([i - width / 2 for i in x], plain, width, label="plain transformers")
    ax.bar([i + width / 2 for i in x], kv, width, label="with kvtier")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['speedup']:.1f}x", (i, max(plain[i], kv[i])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_xlabel("conversation, turn / cached of prompt tokens")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def run_demo(model_path: str | None = None, cache_dir: str | None = None, turns: int | None = None,
             conversations: int | None = None, *, repeats: int | None = None, doc_tokens: int | None = None,
             quick: bool = False, json_out: str | None = None, png_out: str | None = None) -> dict[str, Any]:
    """Run the demo; a size left None takes its default (QUICK's with `quick`, see demo_params)."""
    from rich.progress import Progress

    from kvtier.connectors.transformers import TransformersConnector, model_identity
    from kvtier.core.config import default_cache_dir

    params = demo_params(quick, turns=turns, conversations=conversations, repeats=repeats, doc_tokens=doc_tokens)
    from kvtier.bench.ttft import pick_torch_threads

    threads, why = pick_torch_threads()
    torch.set_num_threads(threads)
    from kvtier.connectors.copy_engine import choose_device

    device = choose_device()  # the GPU when there is one
    model, described = demo_model(model_path, quick)
    model.to(device)
    print(f"model: {described}, on {device}; {why}")
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "demo"
    print(f"store: DRAM tier (512 MiB) + disk tier at {root} (cleared before each repeat); {CHUNK_TOKENS}-token chunks")
    print(f"workload: a {params.doc_tokens}-token shared document, {params.conversations} chats x {params.turns} turns "
          f"({params.question_tokens}-token questions, {params.reply_tokens}-token replies); warm-up first, then "
          f"{params.repeats} alternating repeats per side, medians")
    vocab = model.config.vocab_size
    script = _Script.draw(vocab, params)
    longest = params.doc_tokens + params.turns * (params.question_tokens + params.reply_tokens)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and longest > max_positions:
        raise ConfigError(f"the longest prompt would have {longest} tokens, more than the model's "
                         f"max_position_embeddings ({max_positions}): lower --doc-tokens or --turns")
    t0 = time.perf_counter()
    fingerprint = model_identity(model)
    fingerprint_s = time.perf_counter() - t0

    def connector(store: Any) -> Any:
        return TransformersConnector(model, store, fingerprint=fingerprint)

    cells = [(c, t) for c in range(params.conversations) for t in range(params.turns)]
    plain_s: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    kv_s: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    cached: dict[tuple[int, int], int] = {}
    checks: dict[tuple[int, int], dict[str, Any]] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("warm-up", total=1 + params.repeats * len(cells))
        _warm_up(model, connector, root, vocab, params.doc_tokens)
        progress.advance(task)
        for r in range(params.repeats):
            progress.update(task, description=f"repeat {r + 1}/{params.repeats}")
            store = _fresh_store(model, root)
            conn = connector(store)
            try:
                for n, (c, t) in enumerate(cells):
                    ids = torch.tensor([script.prompt(c, t)], device=device)
                    results: dict[str, tuple[Any, torch.Tensor]] = {}
                    for side in (("plain", "kvtier") if (r + n) % 2 == 0 else ("kvtier", "plain")):
                        start = time.perf_counter()
                        if side == "plain":
                            results[side] = _plain_first_token(model, ids)
                        else:
                            results[side] = _kvtier_first_token(conn, ids)
                        int(results[side][1].argmax())  # the first token itself
                        (plain_s if side == "plain" else kv_s)[(c, t)].append(time.perf_counter() - start)
                        if side == "kvtier":
                            store.flush()  # untimed: its background disk writes must not slow the plain side
                    plan = results["kvtier"][0].last_plan
                    if r == 0:
                        cached[(c, t)] = int(plan.cached_tokens[0])
                        plain_logits = _decode(model, {"past_key_values": results["plain"][0]},
                                               results["plain"][1], ids.shape[1], params.reply_tokens)
                        kv_cache = results["kvtier"][0]
                        kv_logits = _decode(model, conn.cache_kwargs(kv_cache), results["kvtier"][1], ids.shape[1],
                                            params.reply_tokens)
                        script.replies[c].append([int(x.argmax()) for x in plain_logits])
                        checks[(c, t)] = compare_replies(plain_logits, kv_logits)
                    elif int(plan.cached_tokens[0]) != cached[(c, t)]:
                        raise RuntimeError(f"repeat {r + 1} of conversation {c + 1} turn {t + 1} found "
                                           f"{plan.cached_tokens[0]} stored tokens, the first found {cached[(c, t)]}")
                    del results
                    progress.advance(task)
            finally:
                store.close()

    # After a restart: DRAM empty, the disk tier still holds every chunk of the last repeat.
    from kvtier.core import metrics as m

    store = _open_store(model, root)
    try:
        conn = connector(store)
        ids = torch.tensor([script.prompt(*cells[-1])], device=device)
        start = time.perf_counter()
        cache, logits = _kvtier_first_token(conn, ids)
        int(logits.argmax())
        restart = {"prompt_tokens": ids.shape[1], "ttft_s": time.perf_counter() - start,
                   "cached_tokens": int(cache.last_plan.cached_tokens[0]),
                   "disk_chunks_read": int(store.metrics.get(m.HITS, tier="disk"))}
    finally:
        store.close()

    rows: list[dict[str, Any]] = []
    table = []
    for c, t in cells:
        base, kv = statistics.median(plain_s[(c, t)]), statistics.median(kv_s[(c, t)])
        prompt_tokens = len(script.prompt(c, t))
        row = {"conversation": c + 1, "turn": t + 1, "prompt_tokens": prompt_tokens, "cached_tokens": cached[(c, t)],
               "ttft_no_kvtier_s": base, "ttft_kvtier_s": kv, "speedup": base / kv,
               "ttft_no_kvtier_runs_s": plain_s[(c, t)], "ttft_kvtier_runs_s": kv_s[(c, t)], **checks[(c, t)]}
        rows.append(row)
        table.append([c + 1, t + 1, prompt_tokens, cached[(c, t)], f"{1000 * base:.0f}", f"{1000 * kv:.0f}",
                      f"{base / kv:.1f}x", _verdict(checks[(c, t)])])
    print_table(f"TTFT per turn, median of {params.repeats}: plain transformers vs kvtier (same prompts, both warm)",
                ["conv", "turn", "prompt tok", "cached tok", "TTFT plain ms", "TTFT kvtier ms", "speed-up",
                 "same reply"], table)
    hit = sum(r["cached_tokens"] for r in rows)
    seen = sum(r["prompt_tokens"] for r in rows)
    total_base = sum(r["ttft_no_kvtier_s"] for r in rows)
    total_kv = sum(r["ttft_kvtier_s"] for r in rows)
    mostly = [r for r in rows if r["cached_tokens"] > MOSTLY_CACHED * r["prompt_tokens"]]
    slower = [f"c{r['conversation']}t{r['turn']}" for r in mostly if r["speedup"] <= 1.0]
    print(f"hit ratio: {hit / seen:.1%} of prompt tokens loaded from the store ({hit} of {seen}); "
          f"total TTFT {total_base:.2f} s -> {total_kv:.2f} s")
    print(f"rows with most of the prompt stored: {len(mostly)}, speed-up {min((r['speedup'] for r in mostly), default=0):.1f}x"
          f" to {max((r['speedup'] for r in mostly), default=0):.1f}x" + (f"; SLOWER with kvtier: {slower}" if slower else ""))
    print(f"after a restart (DRAM empty): a {restart['prompt_tokens']}-token prompt loaded "
          f"{restart['cached_tokens']} tokens from the disk tier ({restart['disk_chunks_read']} chunks); "
          f"TTFT {1000 * restart['ttft_s']:.0f} ms (one run)")
    mismatches = [r for r in rows if not r["same_reply"] and not r["near_tie"]]
    if mismatches:
        print(f"REPLY MISMATCH beyond float32 noise in {len(mismatches)} rows: see the table")
    print(f"(model fingerprint computed once in {fingerprint_s:.2f} s)")
    result = {"model": described, "device": device, "store_root": str(root), "chunk_tokens": CHUNK_TOKENS, "params": asdict(params),
              "torch_threads": threads, "turns": rows, "hit_ratio": hit / seen, "total_ttft_no_kvtier_s": total_base,
              "total_ttft_kvtier_s": total_kv, "mostly_cached_rows_slower": slower,
              "reply_mismatches": len(mismatches), "restart": restart}
    write_json(json_out, result)
    if png_out:
        _plot(png_out, rows, f"kvtier demo: {params.doc_tokens}-token shared document, {params.conversations} chats x "
              f"{params.turns} turns; median TTFT of {params.repeats}")
    return result

