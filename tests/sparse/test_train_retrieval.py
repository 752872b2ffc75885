"""scripts/train_retrieval.py runs end to end for a few steps; the committed checkpoint loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kvtier.bench.sparse import (
    CHECKPOINT_DIR,
    RetrievalTask,
    last_position_logits,
    load_retrieval_model,
    retrieval_batch,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_retrieval.py"


def test_training_script_runs_a_few_steps(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("train_retrieval", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    meta = mod.train(tmp_path, steps=3, long_steps=2, short_len=32, length=64, seed=0)
    assert meta["trained_length"] == 64
    model, task, _ = load_retrieval_model(tmp_path)
    assert model.config.vocab_size == task.vocab


def test_training_script_resumes_from_a_checkpoint(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("train_retrieval", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    first, second = tmp_path / "a", tmp_path / "b"
    mod.train(first, steps=2, long_steps=1, short_len=32, length=64, seed=0)
    before, _, _ = load_retrieval_model(first)
    meta = mod.train(second, steps=2, long_steps=1, short_len=32, length=64, seed=0, resume=first, lr=1e-3)
    assert meta["resumed"][0]["steps"] == 2 and meta["lr"] == 1e-3
    after, _, meta2 = load_retrieval_model(second)
    assert meta2["resumed"] == meta["resumed"]
    # it continued from the first run's weights, not from a fresh init
    w0 = before.model.embed_tokens.weight
    w1 = after.model.embed_tokens.weight
    fresh = mod.build_retrieval_model(mod.RetrievalTask(), 0).model.embed_tokens.weight
    assert (w1 - w0).abs().max() < (w1 - fresh).abs().max()
    assert not torch.equal(w0, w1)


def test_committed_checkpoint_and_fast_forward_agree() -> None:
    model, task, meta = load_retrieval_model(CHECKPOINT_DIR)
    assert meta["trained_length"] >= 2048
    ids, _ = retrieval_batch(task, 2, 100, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(last_position_logits(model, ids), model(ids).logits[:, -1], atol=1e-4)


def test_task_layout() -> None:
    task = RetrievalTask()
    ids, ans = retrieval_batch(task, 3, 50, torch.Generator().manual_seed(1))
    assert ids.shape == (3, 50) and bool((ids < task.vocab).all())
    assert bool((ids[:, -1] >= task.query_base).all()) and bool((ans >= task.answer_base).all())
    needles = (ids >= task.needle_base) & (ids < task.query_base)
    assert needles.sum(1).tolist() == [task.needles] * 3
