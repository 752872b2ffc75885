"""Train the sparse benchmark's retrieval model on the multi-key recall task (kvtier.bench.sparse).

A stock 1-layer Llama learns to answer "which value went with key k?" among 8 needles in
noise. Curriculum: most steps at short lengths growing to --short-length (cheap), then steps at the target length
(2048 by default), so the committed checkpoint is trained at the length it is evaluated on.
About 7 minutes on 2 shared CPU cores with the defaults; CI runs it with --steps 3 --long-steps 2.

    python scripts/train_retrieval.py [--out DIR] [--steps N] [--long-steps N] [--length 2048]
    python scripts/train_retrieval.py --resume DIR --out NEW_DIR [--lr 1e-3] ...  # continue training

--resume starts from a saved checkpoint (the committed one: --resume src/kvtier/sparse/data/retrieval)
and skips the needle curriculum: its --steps are all at --short-length with every needle.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvtier.bench.sparse import (
    CHECKPOINT_DIR,
    RetrievalTask,
    build_retrieval_model,
    last_position_logits,
    retrieval_batch,
)


def accuracy(model, task: RetrievalTask, length: int, n: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    ids, ans = retrieval_batch(task, n, length, gen)
    with torch.no_grad():
        logits = last_position_logits(model, ids)
    return float((logits.argmax(-1) == ans).float().mean())


def train(out: Path, steps: int, long_steps: int, short_len: int, length: int, seed: int,
          resume: Path | None = None, lr: float = 3e-3) -> dict:
    torch.manual_seed(seed)
    prior: dict | None = None
    if resume is not None:
        from transformers import LlamaForCausalLM

        prior = json.loads((resume / "task.json").read_text())
        task = RetrievalTask(**prior["task"])
        model = LlamaForCausalLM.from_pretrained(str(resume), dtype=torch.float32)
    else:
        task = RetrievalTask()
        model = build_retrieval_model(task, seed)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # a resumed run draws fresh batches, not the ones the checkpoint already saw
    rounds = 0 if prior is None else 1 + len(prior.get("resumed", []))
    gen = torch.Generator().manual_seed(seed + 1 + 1000 * rounds)
    total = steps + long_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2), pct_start=0.1)
    t0 = time.perf_counter()
    log = []
    model.train()
    for step in range(total):
        long = step >= steps
        # curriculum: 1, 2, 4, then all needles at short_len / 8, / 4, / 2, short_len; then the target length
        stage = 3 if resume is not None else min(3, 4 * step // max(steps, 1))
        cur = length if long else short_len >> (3 - stage)
        needles = task.needles if long else min(task.needles, 1 << stage)
        ids, ans = retrieval_batch(task, 4 if long else 32, max(cur, 2 * task.needles), gen, needles)
        logits = last_position_logits(model, ids)
        loss = torch.nn.functional.cross_entropy(logits, ans)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == total - 1:
            acc = float((logits.argmax(-1) == ans).float().mean())
            log.append({"step": step, "length": ids.shape[1], "loss": float(loss.detach()), "batch_acc": acc})
            print(f"step {step:5d} len {ids.shape[1]:5d} loss {float(loss.detach()):.3f} acc {acc:.2f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    eval_acc = {str(n): accuracy(model, task, n, 64, 1234) for n in (short_len, length)}
    print("eval accuracy", eval_acc)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    meta = {"task": asdict(task), "trained_length": length, "short_length": short_len, "steps": steps,
            "long_steps": long_steps, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "eval_accuracy": eval_acc, "lr": lr, "log": log}
    if prior is not None:
        # keep the history: what the resumed checkpoint was, then this run's settings
        earlier = {k: prior[k] for k in ("steps", "long_steps", "seed", "lr", "seconds", "eval_accuracy")
                   if k in prior}
        meta["resumed"] = prior.get("resumed", []) + [earlier]
    (out / "task.json").write_text(json.dumps(meta, indent=1))
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--steps", type=int, default=3000, help="steps at lengths up to --short-length")
    ap.add_argument("--long-steps", type=int, default=500, help="steps at --length")
    ap.add_argument("--short-length", type=int, default=256)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint directory")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # a shared CPU: one thread avoids OpenMP stalls
    train(a.out, a.steps, a.long_steps, a.short_length, a.length, a.seed, a.resume, a.lr)


if __name__ == "__main__":
    main()
