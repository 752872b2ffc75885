"""Configuration of `kvtier serve` (a YAML/TOML/JSON file loaded with core.config.load_config).

    layout: {num_layers: 32, num_kv_heads: 8, head_size: 128, dtype: bfloat16}
    store: {chunk_tokens: 16, memory: {capacity_bytes: 64GiB}, disk: {root: /nvme/kvtier}}
    socket_path: /run/kvtier/kvtier.sock     # "" = /tmp/kvtier-<uid>/kvtier.sock (a private folder)
    group: kvusers                           # socket and pool become 0o660, the folder 0o750, for this group
    metrics_port: 9464                       # Prometheus on 127.0.0.1; 0 = off
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.core.config import StoreConfig
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
    metrics_port: int = 0
    max_lease_s: float = 300.0  # upper bound on any lease a client asks for
    message_timeout_s: float = 5.0  # a started message must complete within this
    max_clients: int = 256

    def __post_init__(self) -> None:
        if self.layout is None:
            raise ConfigError("service.layout must be set (num_layers, num_kv_heads, head_size, dtype)")
        if self.store.memory is None:
            raise ConfigError("service.store.memory must be configured: the service owns the DRAM pool")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"service.metrics_port must be 0..65535, got {self.metrics_port}")
        if self.max_lease_s <= 0 or self.message_timeout_s <= 0:
            raise ConfigError("service.max_lease_s and service.message_timeout_s must be positive")
        if self.max_clients <= 0:
            raise ConfigError(f"service.max_clients must be positive, got {self.max_clients}")
        if "/" in self.shm_name:
            raise ConfigError(f"service.shm_name must not contain '/', got {self.shm_name!r}")
