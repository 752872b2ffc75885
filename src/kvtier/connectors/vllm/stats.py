"""kvtier's numbers in vLLM's own /metrics, through vLLM 0.32's connector stats API.

Who calls what, and where:
- scheduler process: KVTierConnector.update_state_after_alloc records each request's hit tokens
  (loaded from the store) and computed tokens (prefilled by vLLM) in a `StatsRecorder`;
- worker process: the worker records the seconds each request's load took and each save took;
- vLLM calls `get_kv_connector_stats()` on both sides every step, sends the worker's stats to
  the scheduler (pickled), merges them with `aggregate`, and hands the dict (`to_dict`) to its
  stat loggers, which rebuild it with `build_kv_connector_stats` (log lines: `reduce`) and feed
  `KVTierPromMetrics.observe` (Prometheus, built by `build_prom_metrics`).

The payload is a flat dict of plain numbers and lists, so it survives any serialization:
    {"hit_tokens": int, "computed_tokens": int, "load_seconds": [float], "save_seconds": [float]}
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvtier.core import metrics as m

if TYPE_CHECKING:
    from vllm.config import VllmConfig

COUNTS = ("hit_tokens", "computed_tokens")
SAMPLES = ("load_seconds", "save_seconds")

# vLLM's metric names carry its "vllm:" prefix; the rest are kvtier's connector names
PROM_HIT_TOKENS = "vllm:" + m.HIT_TOKENS.removesuffix("_total")
PROM_COMPUTED_TOKENS = "vllm:" + m.COMPUTED_TOKENS.removesuffix("_total")
PROM_LOAD_TIME = "vllm:" + m.CONNECTOR_LOAD_TIME
PROM_SAVE_TIME = "vllm:" + m.CONNECTOR_SAVE_TIME


def empty_data() -> dict[str, Any]:
    return {"hit_tokens": 0, "computed_tokens": 0, "load_seconds": [], "save_seconds": []}


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    """One interval's kvtier numbers: token counts add up, time samples concatenate."""

    def __post_init__(self) -> None:
        data = empty_data()
        for key in COUNTS:
            data[key] = int(self.data.get(key, 0))
        for key in SAMPLES:
            data[key] = [float(v) for v in self.data.get(key, ())]
        self.data = data

    def reset(self) -> None:
        self.data = empty_data()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other.is_empty():
            return self
        for key in COUNTS:
            self.data[key] += int(other.data.get(key, 0))
        for key in SAMPLES:
            self.data[key].extend(float(v) for v in other.data.get(key, ()))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {key: self.data[key] for key in COUNTS}
        for key in SAMPLES:
            samples = self.data[key]
            out[f"{key.removesuffix('_seconds')}_requests"] = len(samples)
            out[f"{key}_median"] = round(statistics.median(samples), 6) if samples else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in COUNTS) and not any(self.data[key] for key in SAMPLES)


class StatsRecorder:
    """What one side of the connector saw since vLLM last asked; thread-safe (the worker's
    saves and loads finish on the engine's thread, vLLM asks from the same or another)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = empty_data()

    def add_tokens(self, hit: int, computed: int) -> None:
        with self._lock:
            self._data["hit_tokens"] += max(hit, 0)
            self._data["computed_tokens"] += max(computed, 0)

    def add_load(self, seconds: float) -> None:
        with self._lock:
            self._data["load_seconds"].append(seconds)

    def add_save(self, seconds: float) -> None:
        with self._lock:
            self._data["save_seconds"].append(seconds)

    def take(self) -> KVTierConnectorStats | None:
        """The interval's stats (None when nothing happened), and a fresh interval."""
        with self._lock:
            data, self._data = self._data, empty_data()
        stats = KVTierConnectorStats(data=data)
        return None if stats.is_empty() else stats


class KVTierPromMetrics(KVConnectorPromMetrics):
    """kvtier's hit and computed tokens (counters) and per-request load and save times
    (histograms) among vLLM's metrics, one series per engine."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter_cls: Any = self._counter_cls  # vLLM's wrappers of prometheus-client's classes
        histogram_cls: Any = self._histogram_cls
        hit = counter_cls(name=PROM_HIT_TOKENS, documentation=m.HELP[m.HIT_TOKENS], labelnames=labelnames)
        computed = counter_cls(name=PROM_COMPUTED_TOKENS, documentation=m.HELP[m.COMPUTED_TOKENS],
                               labelnames=labelnames)
        load = histogram_cls(name=PROM_LOAD_TIME, documentation=m.HELP[m.CONNECTOR_LOAD_TIME],
                             labelnames=labelnames, buckets=list(m.LATENCY_BUCKETS))
        save = histogram_cls(name=PROM_SAVE_TIME, documentation=m.HELP[m.CONNECTOR_SAVE_TIME],
                             labelnames=labelnames, buckets=list(m.LATENCY_BUCKETS))
        self.families = (hit, computed, load, save)
        self._per_engine: dict[int, dict[str, Any]] = {
            idx: {"hit_tokens": hit.labels(*values), "computed_tokens": computed.labels(*values),
                  "load_seconds": load.labels(*values), "save_seconds": save.labels(*values)}
            for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        series = self._per_engine[engine_idx]
        for key in COUNTS:
            value = transfer_stats_data.get(key, 0)
            if value:
                series[key].inc(value)
        for key in SAMPLES:
            for seconds in transfer_stats_data.get(key, ()):
                series[key].observe(seconds)
