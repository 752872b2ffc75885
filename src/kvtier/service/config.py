"""Configuration of `kvtier serve` (a YAML/TOML/JSON file loaded with core.config.load_config).

    layout: {num_layers: 32, num_kv_heads: 8, head_size: 128, dtype: bfloat16}
    store: {chunk_tokens: 16, memory: {capacity_bytes: 64GiB}, disk: {root: /nvme/kvtier}}
    socket_path: /run/kvtier/kvtier.sock     # "" = /tmp/kvtier-<uid>/kvtier.sock (a private folder)
    group: kvusers                           # socket and pool become 0o660, the folder 0o750, for this group
    metrics_port: 9464                       # Prometheus on 127.0.0.1; 0 = off
    metrics: true                            # false: record no metrics at all (measuring their cost)
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        check_fields(self, "service")
        if self.layout is None:
            raise ConfigError("service.layout must be set (num_layers, num_kv_heads, head_size, dtype)")
        if self.store.memory is None:
            raise ConfigError("service.store.memory must be configured: the service owns the DRAM pool")
        if not self.metrics and self.metrics_port:
            raise ConfigError(f"service.metrics_port {self.metrics_port} is set but service.metrics is false: "
                              "there would be nothing to serve; set metrics_port to 0 or metrics to true")
        if "/" in self.shm_name:
            raise ConfigError(f"service.shm_name must not contain '/', got {self.shm_name!r}")
