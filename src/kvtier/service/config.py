"""Configuration of `kvtier serve` (a YAML/TOML/JSON file loaded with core.config.load_config).

    layout: {num_layers: 32, num_kv_heads: 8, head_size: 128, dtype: bfloat16}
    store: {chunk_tokens: 16, memory: {capacity_bytes: 64GiB}, disk: {root: /nvme/kvtier}}
    socket_path: /run/kvtier/kvtier.sock     # "" = /tmp/kvtier-<uid>/kvtier.sock (a private folder)
    group: kvusers                           # socket and pool become 0o660, the folder 0o750, for this group
    metrics_port: 9464                       # Prometheus on 127.0.0.1; 0 = off
    metrics: true                            # false: record no metrics at all (measuring their cost)
    events: {endpoint: "tcp://127.0.0.1:5557", replay_endpoint: "tcp://127.0.0.1:5558"}
                                             # KV events of the service's tiers (kvtier.events.EventsConfig);
                                             # absent = none. Needs the `events` extra (pyzmq, msgspec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.core.config import StoreConfig, check_fields, number_field
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout


@dataclass(slots=True, frozen=True)
class ServiceConfig:
    layout: KVLayout | None = None
    store: StoreConfig = field(default_factory=StoreConfig)
    socket_path: str = ""
    shm_name: str = ""  # "" = derived from the socket path
    group: str = ""  # group name or number allowed besides the owner; "" = owner only
    metrics_host: str = "127.0.0.1"
    metrics_port: int = number_field(0, low=0, high=65535)
    max_lease_s: float = number_field(300.0, low=0, low_open=True)  # upper bound on any lease a client asks for
    message_timeout_s: float = number_field(5.0, low=0, low_open=True)  # a started message must complete within this
    max_clients: int = number_field(256, low=0, low_open=True)
    metrics: bool = True  # false: a store that records nothing (NullMetrics), to measure what metrics cost
    events: dict[str, Any] | None = None  # an EventsConfig's keys: the service publishes its tiers' KV events

    def __post_init__(self) -> None:
        check_fields(self, "service")
        if self.layout is None:
            raise ConfigError("service.layout must be set (num_layers, num_kv_heads, head_size, dtype)")
        if self.store.memory is None:
            raise ConfigError("service.store.memory must be configured: the service owns the DRAM pool")
        if not self.metrics and self.metrics_port:
            raise ConfigError(f"service.metrics_port {self.metrics_port} is set but service.metrics is false: "
                              "there would be nothing to serve; set metrics_port to 0 or metrics to true")
        if self.events is not None:
            self.events_config()  # a bad key or value fails here, naming it
        if "/" in self.shm_name:
            raise ConfigError(f"service.shm_name must not contain '/', got {self.shm_name!r}")

    def events_config(self) -> Any:
        """The EventsConfig of `events` (None when absent); imports kvtier.events only when set."""
        if self.events is None:
            return None
        if not isinstance(self.events, dict):
            raise ConfigError(f"service.events: expected a section (endpoint, replay_endpoint, ...), got {self.events!r}")
        try:
            from kvtier.events.config import EventsConfig
        except ImportError as e:
            raise ConfigError(f"service.events needs the events extra (pip install 'kvtier[events]'): {e}") from None
        from kvtier.core.config import load_config

        return load_config(EventsConfig, self.events, "service.events")
