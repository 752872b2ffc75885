"""Metric names and each store's metrics, on prometheus-client.

Why prometheus-client: it is the reference implementation of the exposition format, its
counters and histograms are thread-safe, and it serves a registry over HTTP; kvtier's own
text renderer and HTTP handler are gone. No global registry: each store owns a `Metrics`
holding its own `CollectorRegistry`, so several stores in one process never collide and
tests read exact values (`get`).

Callers keep a small name-based API (`inc`, `set`, `observe`, `get`), so a tier counts a hit
with `metrics.inc(HITS, n, tier=name)` and never handles prometheus-client objects. A metric
family is created on its first use, with the label names of that use (`tier` for tier
metrics, `connector` for connector metrics); its kind comes from KINDS (default: counter for
`inc`, gauge for `set`, histogram for `observe`).

Latency histograms (LOOKUP_LATENCY, LOAD_LATENCY, SAVE_LATENCY per tier; CONNECTOR_LOAD_TIME,
CONNECTOR_SAVE_TIME per connector) are observed once per batch or per request, never per
chunk, so their cost does not grow with the batch.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from kvtier.core.errors import ConfigError

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
CAPACITY_BYTES = "kvtier_tier_capacity_bytes"
WRITES_REFUSED = "kvtier_tier_writes_refused_total"
READ_ERRORS = "kvtier_tier_read_errors_total"
ORPHANS_DROPPED = "kvtier_tier_orphans_dropped_total"
TIER_UNAVAILABLE = "kvtier_tier_unavailable_total"
FOREIGN_CHUNKS = "kvtier_tier_foreign_chunks_total"
LOOKUP_LATENCY = "kvtier_tier_lookup_latency_seconds"
LOAD_LATENCY = "kvtier_tier_load_latency_seconds"
SAVE_LATENCY = "kvtier_tier_save_latency_seconds"
SERVED_TOKENS = "kvtier_tier_served_tokens_total"
# Per connector (label connector="vllm"|"transformers")
HIT_TOKENS = "kvtier_connector_hit_tokens_total"
COMPUTED_TOKENS = "kvtier_connector_computed_tokens_total"
LOAD_SECONDS = "kvtier_connector_load_seconds_total"
SAVE_SECONDS = "kvtier_connector_save_seconds_total"
LOAD_FAILURES = "kvtier_connector_load_failures_total"
SAVE_FAILURES = "kvtier_connector_save_failures_total"
PREFILL_TOKENS = "kvtier_connector_prefill_tokens_total"
LOADS_SKIPPED = "kvtier_connector_loads_skipped_total"
HEAD_TOKENS = "kvtier_connector_head_tokens_total"
CONNECTOR_LOAD_TIME = "kvtier_connector_load_time_seconds"
CONNECTOR_SAVE_TIME = "kvtier_connector_save_time_seconds"

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
    CAPACITY_BYTES: "Bytes the tier may use.",
    WRITES_REFUSED: "Chunk writes the tier declined (no room without cutting a chain, parent not stored).",
    READ_ERRORS: "Chunk reads that failed with an I/O error (the chunk was a miss, its file kept).",
    ORPHANS_DROPPED: "Chunks dropped at open because their parent was not stored (unreachable).",
    TIER_UNAVAILABLE: "Chunk requests a networked tier could not answer (timeout, refused, breaker open): misses.",
    FOREIGN_CHUNKS: "Values of another KV layout found under this store's names: misses, left alone.",
    LOOKUP_LATENCY: "Seconds one batched lookup spent in the tier.",
    LOAD_LATENCY: "Seconds one batched load took to bring its chunks from the tier.",
    SAVE_LATENCY: "Seconds one batched save took to write its chunks into the tier.",
    SERVED_TOKENS: "Prompt tokens loaded from the tier (chunks loaded times chunk_tokens), whoever asked.",
    HIT_TOKENS: "Prompt tokens served from the store.",
    COMPUTED_TOKENS: "Prompt tokens the engine computed (not served from the store).",
    LOAD_SECONDS: "Seconds spent loading KV into the engine.",
    SAVE_SECONDS: "Seconds spent saving KV from the engine.",
    LOAD_FAILURES: "Chunk loads that failed and were recomputed.",
    SAVE_FAILURES: "Chunks a save could not store.",
    PREFILL_TOKENS: "Prompt tokens the connector was asked to prefill.",
    LOADS_SKIPPED: "Stored chunks recomputed because loading them was estimated slower than computing them.",
    HEAD_TOKENS: "Stored prompt tokens computed by a head forward while the rest of their prefix loaded.",
    CONNECTOR_LOAD_TIME: "Seconds the connector spent loading one request's KV.",
    CONNECTOR_SAVE_TIME: "Seconds the connector spent saving one request's KV.",
}

# 10 us .. 10 s: a DRAM index lookup takes microseconds, a Redis batch or a disk save
# milliseconds to seconds; prometheus-client's default buckets start at 5 ms.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
KINDS = {
    USED_BYTES: GAUGE, CAPACITY_BYTES: GAUGE,
    LOOKUP_LATENCY: HISTOGRAM, LOAD_LATENCY: HISTOGRAM, SAVE_LATENCY: HISTOGRAM,
    CONNECTOR_LOAD_TIME: HISTOGRAM, CONNECTOR_SAVE_TIME: HISTOGRAM,
}

# Series every tier has from the start, at 0: a rate or a ratio over them is defined before
# the first failure or eviction (Prometheus's advice for labelled counters).
TIER_COUNTERS = (HITS, MISSES, BYTES_READ, BYTES_WRITTEN, EVICTIONS, CHECKSUM_FAILURES, WRITE_FAILURES,
                 SERVED_TOKENS)
# Likewise every connector's counters, from the connector's start: "loads skipped" in particular
# stays 0 on a CPU, where loading always pays, and its panel should say 0 rather than "no data".
CONNECTOR_COUNTERS = (HIT_TOKENS, COMPUTED_TOKENS, PREFILL_TOKENS, LOADS_SKIPPED, HEAD_TOKENS, LOAD_FAILURES,
                      SAVE_FAILURES)

Labels = tuple[tuple[str, str], ...]


class MetricsPortInUseError(ConfigError):
    """The metrics port is taken by another process (or another store)."""


class Metrics:
    """One store's counters, gauges and histograms in its own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._families: dict[str, Any] = {}
        self._labelnames: dict[str, tuple[str, ...]] = {}
        self._children: dict[tuple[str, Labels], Any] = {}
        self._server: Any = None

    # -- recording ---------------------------------------------------------------------
    def counter(self, name: str, **labels: str) -> Any:
        """A handle on one series, for hot paths: .inc() without looking the labels up again."""
        return self._child(name, COUNTER, labels)

    def histogram(self, name: str, **labels: str) -> Any:
        """A handle on one histogram series: .observe(seconds)."""
        return self._child(name, HISTOGRAM, labels)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, COUNTER, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, GAUGE, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, HISTOGRAM, labels).observe(value)

    def _child(self, name: str, default_kind: str, labels: dict[str, str]) -> Any:
        key = (name, tuple(sorted(labels.items())))
        child = self._children.get(key)
        if child is not None:
            return child
        with self._lock:
            child = self._children.get(key)
            if child is None:
                family = self._family(name, KINDS.get(name, default_kind), tuple(k for k, _ in key[1]))
                child = family.labels(**labels) if labels else family
                self._children[key] = child
        return child

    def _family(self, name: str, kind: str, labelnames: tuple[str, ...]) -> Any:
        family = self._families.get(name)
        if family is not None:
            if self._labelnames[name] != labelnames:
                raise ValueError(f"metric {name} has labels {self._labelnames[name]}, not {labelnames}")
            return family
        doc = HELP.get(name, name)
        if kind == HISTOGRAM:
            family = Histogram(name, doc, labelnames, registry=self.registry, buckets=LATENCY_BUCKETS)
        elif kind == GAUGE:
            family = Gauge(name, doc, labelnames, registry=self.registry)
        else:
            family = Counter(name, doc, labelnames, registry=self.registry)
        self._families[name] = family
        self._labelnames[name] = labelnames
        return family

    # -- reading -----------------------------------------------------------------------
    def get(self, name: str, **labels: str) -> float:
        """The value of one series (0 if never recorded): a counter's total, a gauge's value,
        or a histogram's `_count`/`_sum` sample when asked by that name."""
        want = dict(labels)
        base = name
        for suffix in ("_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in self._families:
                base = name[: -len(suffix)]
        family = self._families.get(base)
        if family is None:
            return 0.0
        names = {name, name + "_total"} if base == name else {name}
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name in names and sample.labels == want:
                    return float(sample.value)
        return 0.0

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge series, and each histogram's count and sum, by series name."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name.endswith(("_created", "_bucket")):
                    continue
                out[_series(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return dict(sorted(out.items()))

    def render_prometheus(self) -> str:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry).decode()

    # -- extras and serving ------------------------------------------------------------
    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add families computed at scrape time (the service's client and slot gauges)."""
        self.registry.register(_CallbackCollector(collect))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve this registry at http://host:port/metrics on a daemon thread; returns the
        bound port (useful with port 0). A port already taken raises MetricsPortInUseError
        naming it."""
        if self._server is not None:
            raise RuntimeError(f"metrics already served on port {self._server[0].server_port}")
        try:
            self._server = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MetricsPortInUseError(
                    f"metrics_port {port}: {host}:{port} is already in use by another process; "
                    "choose another port (0 picks a free one)") from None
            raise ConfigError(f"metrics_port {port}: cannot listen on {host}:{port}: {e}") from None
        return int(self._server[0].server_port)

    @property
    def served_port(self) -> int | None:
        return int(self._server[0].server_port) if self._server is not None else None

    def stop_serving(self) -> None:
        """Stop the HTTP server: a scrape in flight finishes or gets a closed connection."""
        server, self._server = self._server, None
        if server is not None:
            httpd, thread = server
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)


class _NullSeries:
    """A series handle that records nothing."""

    __slots__ = ()

    def inc(self, value: float = 1.0) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, value: float) -> None:
        return None


_NULL_SERIES = _NullSeries()


class NullMetrics(Metrics):
    """Records nothing: for measuring what recording metrics costs (kvtier serve with
    `metrics: false`). Reads return 0; the registry stays empty."""

    def counter(self, name: str, **labels: str) -> Any:
        return _NULL_SERIES

    def histogram(self, name: str, **labels: str) -> Any:
        return _NULL_SERIES

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        return None

    def set(self, name: str, value: float, **labels: str) -> None:
        return None

    def observe(self, name: str, value: float, **labels: str) -> None:
        return None


class _CallbackCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time: no fixed names to check for collisions


class BatchTimer:
    """Seconds spent in each tier over one batch, observed once per tier at the end:
    one histogram observation per batch, however many chunks it has."""

    __slots__ = ("_metrics", "_name", "_seconds")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self._seconds: dict[str, float] = {}

    def add(self, tier: str, seconds: float) -> None:
        self._seconds[tier] = self._seconds.get(tier, 0.0) + seconds

    def observe(self) -> None:
        for tier, seconds in self._seconds.items():
            self._metrics.observe(self._name, seconds, tier=tier)


class RunTimer:
    """Seconds one batched lookup spent on the keys each tier answered, with two clock reads
    per run of consecutive keys answered by the same tier rather than per key (a per-key clock
    cost a lookup of hundreds of DRAM keys about 15%). The caller checks, per key, whether the
    previous key's tier differs from `tier` (a list index and a compare) and calls `switch`
    when it does. Tiers not in `counted` (those that time their own batched calls) are not
    added; `pause` stops the clock around such a call. One observation per tier per batch."""

    __slots__ = ("_timer", "_counted", "tier", "_t0")

    def __init__(self, metrics: Metrics, name: str, counted: frozenset[str] | set[str], first: str | None,
                 started: float | None = None) -> None:
        self._timer = BatchTimer(metrics, name)
        self._counted = counted
        self.tier = first
        self._t0 = time.perf_counter() if started is None else started  # `first`'s run began then

    def switch(self, tier: str | None) -> None:
        now = time.perf_counter()
        if self.tier in self._counted:
            self._timer.add(self.tier, now - self._t0)  # type: ignore[arg-type]
        self.tier, self._t0 = tier, now

    def pause(self) -> None:
        self.switch(None)

    def observe(self) -> None:
        self.switch(None)
        self._timer.observe()


def _series(name: str, labels: Labels) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"{name}{{{inner}}}"
