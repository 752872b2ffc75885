"""Shared pieces of the events and router tests: a store with evictions, ipc endpoints."""

from __future__ import annotations

import random
from pathlib import Path

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.events import EventsConfig, block_hash_of
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY, payload

ROOT = Namespace("events-test", TINY.layout_id(CHUNK)).root()


def ipc_config(tmp_path: Path, **kw: object) -> EventsConfig:
    return EventsConfig(f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay", **kw)  # type: ignore[arg-type]


def small_store(tmp_path: Path, mem_chunks: int = 4, disk_chunks: int = 6) -> TieredStore:
    """DRAM for `mem_chunks` chunks and a disk for about `disk_chunks`: a few chains evict from both."""
    probe = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=None,
                                    disk=DiskTierConfig(root=str(tmp_path / "probe"), capacity_bytes=1 << 20)), TINY)
    keys = chunk_keys(ROOT, list(range(CHUNK)), CHUNK)
    probe.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
    probe.flush()
    file_bytes = probe.disk.usage().used_bytes  # type: ignore[union-attr]
    probe.close()
    cfg = StoreConfig(
        chunk_tokens=CHUNK,
        memory=MemoryTierConfig(capacity_bytes=mem_chunks * TINY.chunk_bytes(CHUNK)),
        disk=DiskTierConfig(root=str(tmp_path / "disk"), capacity_bytes=disk_chunks * file_bytes),
    )
    return TieredStore(cfg, TINY)


def run_traffic(store: TieredStore, prompts: int = 12, seed: int = 0) -> list[list[bytes]]:
    """Save prompts of 1..4 chunks, some sharing a prefix, and load a few: DRAM and disk evict."""
    rng = random.Random(seed)
    chains = []
    for p in range(prompts):
        n = rng.randint(1, 4)
        head = rng.randint(0, 3)  # shared first chunk among prompts with the same head
        tokens = [head] * CHUNK + [1000 * p + t for t in range((n - 1) * CHUNK)]
        keys = chunk_keys(ROOT, tokens, CHUNK)
        store.save(keys, ROOT, 0, [payload(k) for k in keys]).wait()
        chains.append(keys)
        store.lookup(chains[rng.randrange(len(chains))])
    store.flush()
    return chains


def tier_view(store: TieredStore) -> dict[str, set[int]]:
    """What the store's tiers hold, by vLLM medium, as published block hashes."""
    view: dict[str, set[int]] = {"CPU": set(), "STORAGE": set()}
    for tier in store.tiers + store.lower_tiers:
        view["CPU" if tier.name == "memory" else "STORAGE"] |= {block_hash_of(k) for k in tier.keys()}  # type: ignore[attr-defined]
    return view
