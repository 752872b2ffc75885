"""Shared test helpers: tiny layouts and deterministic payloads derived from keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from kvtier.core.layout import KVLayout

TINY = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float32")
CHUNK = 4


def payload(key: bytes, layout: KVLayout = TINY, chunk_tokens: int = CHUNK) -> list[np.ndarray]:
    """Deterministic per-layer section bytes for a key (so any reader can verify them)."""
    lb = layout.layer_bytes(chunk_tokens)
    out = []
    for layer in range(layout.num_layers):
        seed = int.from_bytes(hashlib.sha256(key + bytes([layer])).digest()[:8], "little")
        out.append(np.random.default_rng(seed).integers(0, 256, lb, dtype=np.uint8))
    return out


def key_of(i: int) -> bytes:
    return hashlib.sha256(f"chunk-{i}".encode()).digest()


def shared_models_dir() -> Path:
    return Path(os.environ.get("KVTIER_SHARED_MODELS", Path(__file__).resolve().parents[2] / "shared" / "models"))


@pytest.fixture
def tiny_layout() -> KVLayout:
    return TINY


@pytest.fixture(autouse=True)
def fresh_load_estimates():
    """Each test starts with no load/compute estimates (kvtier.store.planner.ESTIMATES is process-wide,
    so that they survive a store reopen; one test's measurements must not steer another's loads)."""
    from kvtier.store.planner import ESTIMATES

    ESTIMATES.forget()
    yield
