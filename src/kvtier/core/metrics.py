"""Metric names and a tiny thread-safe counter set with Prometheus text exposition.

No global registry: each store owns a `Metrics` and renders it on demand, so several
stores in one process never collide and tests read exact values.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# Per tier (label tier="memory"|"disk"|...)
HITS = "kvtier_tier_hits_total"
MISSES = "kvtier_tier_misses_total"
BYTES_READ = "kvtier_tier_bytes_read_total"
BYTES_WRITTEN = "kvtier_tier_bytes_written_total"
READ_SECONDS = "kvtier_tier_read_seconds_total"
WRITE_SECONDS = "kvtier_tier_write_seconds_total"
EVICTIONS = "kvtier_tier_evictions_total"
CHECKSUM_FAILURES = "kvtier_tier_checksum_failures_total"
WRITE_FAILURES = "kvtier_tier_write_failures_total"
USED_BYTES = "kvtier_tier_used_bytes"
WRITES_REFUSED = "kvtier_tier_writes_refused_total"
READ_ERRORS = "kvtier_tier_read_errors_total"
ORPHANS_DROPPED = "kvtier_tier_orphans_dropped_total"
TIER_UNAVAILABLE = "kvtier_tier_unavailable_total"
FOREIGN_CHUNKS = "kvtier_tier_foreign_chunks_total"
# Per connector (label connector="vllm"|"transformers")
HIT_TOKENS = "kvtier_connector_hit_tokens_total"
LOAD_SECONDS = "kvtier_connector_load_seconds_total"
SAVE_SECONDS = "kvtier_connector_save_seconds_total"
LOAD_FAILURES = "kvtier_connector_load_failures_total"
SAVE_FAILURES = "kvtier_connector_save_failures_total"
PREFILL_TOKENS = "kvtier_connector_prefill_tokens_total"
LOADS_SKIPPED = "kvtier_connector_loads_skipped_total"

HELP = {
    HITS: "Chunks found in the tier.",
    MISSES: "Chunks looked up and not found in the tier.",
    BYTES_READ: "Payload bytes read from the tier.",
    BYTES_WRITTEN: "Payload bytes written to the tier.",
    READ_SECONDS: "Seconds spent reading from the tier.",
    WRITE_SECONDS: "Seconds spent writing to the tier.",
    EVICTIONS: "Chunks evicted from the tier.",
    CHECKSUM_FAILURES: "Chunks that failed validation and were dropped.",
    WRITE_FAILURES: "Chunk writes that failed (disk full, read-only folder, ...).",
    USED_BYTES: "Bytes currently used by the tier.",
    WRITES_REFUSED: "Chunk writes the tier declined (no room without cutting a chain, parent not stored).",
    READ_ERRORS: "Chunk reads that failed with an I/O error (the chunk was a miss, its file kept).",
    ORPHANS_DROPPED: "Chunks dropped at open because their parent was not stored (unreachable).",
    TIER_UNAVAILABLE: "Chunk requests a networked tier could not answer (timeout, refused, breaker open): misses.",
    FOREIGN_CHUNKS: "Values of another KV layout found under this store's names: misses, left alone.",
    HIT_TOKENS: "Prompt tokens served from the store.",
    LOAD_SECONDS: "Seconds spent loading KV into the engine.",
    SAVE_SECONDS: "Seconds spent saving KV from the engine.",
    LOAD_FAILURES: "Chunk loads that failed and were recomputed.",
    SAVE_FAILURES: "Chunks a save could not store.",
    PREFILL_TOKENS: "Prompt tokens the connector was asked to prefill.",
    LOADS_SKIPPED: "Stored chunks recomputed because loading them was estimated slower than computing them.",
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Counters and gauges keyed by (name, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = defaultdict(float)

    def counter(self, name: str, **labels: str) -> Counter:
        """A handle on one series, for hot paths: inc() without re-sorting labels."""
        return Counter(self, (name, tuple(sorted(labels.items()))))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = value

    def get(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            return self._values.get(key, 0.0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            items = list(self._values.items())
        return {_series(n, lb): v for (n, lb), v in sorted(items)}

    def render_prometheus(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                kind = "gauge" if name == USED_BYTES else "counter"
                lines.append(f"# HELP {name} {HELP.get(name, name)}")
                lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{_series(name, labels)} {value:g}")
        return "\n".join(lines) + "\n"


class Counter:
    __slots__ = ("_metrics", "_key")

    def __init__(self, metrics: Metrics, key: tuple[str, Labels]) -> None:
        self._metrics = metrics
        self._key = key

    def inc(self, value: float = 1.0) -> None:
        m = self._metrics
        with m._lock:
            m._values[self._key] += value


def _series(name: str, labels: Labels) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"{name}{{{inner}}}"
