"""The connector's settings: vLLM's `kv_connector_extra_config`, validated by load_config.

    {"socket_path": "",          # "" = /tmp/kvtier-<uid>/vllm-<layout id>.sock (one service per KV layout)
     "auto_start": true,         # start `python -m kvtier.service` when nothing answers on the socket
     "service_config": "",       # the service's config file for auto_start; "" = written from `store`
     "store": {...},             # kvtier StoreConfig for an auto-started service (memory/disk tiers);
                                 # chunk_tokens defaults to vLLM's block_size and must divide it
     "lease_timeout_s": 30.0, "connect_timeout_s": 30.0,
     "retry_after_s": 5.0,       # after the service fails, wait this long before reconnecting
     "save_decode": false,       # also save chunks of generated tokens (multi-turn reuse)
     "partial_chunks": true,     # also save each prompt's partial last chunk (2+ tokens), so an
                                 # exact repeat hits every prompt token but the last
     "model_fingerprint": "",    # override the computed model identity (config + weights)
     "stats_path": "",           # write the scheduler's counters (hits by tier, saves) to this JSON file
     "remote_wait_s": 10.0,      # kv_consumer: how long a request handed over by a prefill instance
                                 # (kv_transfer_params["kvtier"], see pd.py) waits for its chunks to
                                 # appear in the store before it computes what is missing
     "publish_wait_s": 10.0,     # kv_producer: how long a request that asked for a handoff waits, before
                                 # vLLM answers it, for its chunks to be written to the store's lower tiers
                                 # (the shared folder / Redis a decode instance reads); 0 = do not wait
     "plan_loads": true}         # never slower than recomputing: a hit from below DRAM (disk, shared
                                 # folder, Redis) is loaded only where its tier's measured read bandwidth
                                 # beats the engine's measured prefill speed (store/planner.py); false
                                 # loads every hit

An unknown key or a bad value raises ConfigError naming it, so vLLM stops at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier.core.config import StoreConfig, check_fields, load_config, number_field
from kvtier.core.errors import ConfigError


@dataclass(slots=True, frozen=True)
class VLLMConnectorConfig:
    socket_path: str = ""
    auto_start: bool = True
    service_config: str = ""
    store: StoreConfig = field(default_factory=StoreConfig)
    lease_timeout_s: float = number_field(30.0, low=0, low_open=True)
    connect_timeout_s: float = number_field(30.0, low=0, low_open=True)
    retry_after_s: float = number_field(5.0, low=0)
    save_decode: bool = False
    partial_chunks: bool = True
    model_fingerprint: str = ""
    stats_path: str = ""  # the scheduler rewrites this JSON file with its counters when they change
    remote_wait_s: float = number_field(10.0, low=0)
    publish_wait_s: float = number_field(10.0, low=0, high=300.0)  # at most the service's MAX_WAIT_LOWER_S
    plan_loads: bool = True  # the load planner: hits from tiers slower than recomputing are recomputed

    def __post_init__(self) -> None:
        check_fields(self, "kv_connector_extra_config")
        if self.stats_path:
            folder = os.path.dirname(os.path.abspath(self.stats_path))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise ConfigError(f"kv_connector_extra_config.stats_path {self.stats_path!r}: its folder {folder} "
                                  "does not exist or is not writable")


def load_connector_config(extra: Mapping[str, Any] | None, block_size: int) -> VLLMConnectorConfig:
    """Validate vLLM's kv_connector_extra_config; the store's chunk size defaults to `block_size`.

    kvtier's chunk_tokens must divide vLLM's block_size, so every chunk lies inside one block.
    Equal (the default), a CPU block moves as one opaque page; smaller chunks let a hit end
    closer to the prompt's end (fewer tail tokens recomputed) at the cost of strided copies.
    """
    raw = dict(extra or {})
    store = raw.get("store")
    if store is None:
        raw["store"] = {"chunk_tokens": block_size}
    elif isinstance(store, Mapping) and "chunk_tokens" not in store:
        raw["store"] = {**store, "chunk_tokens": block_size}
    cfg = load_config(VLLMConnectorConfig, raw, "kv_connector_extra_config")
    if block_size % cfg.store.chunk_tokens:
        raise ConfigError(
            f"kv_connector_extra_config.store.chunk_tokens is {cfg.store.chunk_tokens} but vLLM's block_size is "
            f"{block_size}; chunk_tokens must divide the block size")
    return cfg
