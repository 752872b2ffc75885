"""Configuration: one frozen dataclass per component, loaded from a dict, YAML or TOML.

`load_config(cls, source)` walks the dataclass fields: unknown keys and bad values
raise ConfigError naming the dotted key ("store.disk.capacity_bytes"). Byte sizes
accept integers or strings such as "512MiB", "4GB".
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvtier.core.errors import ConfigError
from kvtier.core.keys import DEFAULT_HASH_MODE, HASH_MODES
from kvtier.core.layout import KVLayout

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string like '64MiB'; ConfigError naming `key` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    else:
        raise ConfigError(f"{key}: expected a byte size such as 1073741824 or '1GiB', got {value!r}")
    if n < 0:
        raise ConfigError(f"{key}: byte size must be >= 0, got {value!r}")
    return n


def _size(default: int) -> Any:
    return field(default=default, metadata={"size": True})


@dataclass(slots=True, frozen=True)
class MemoryTierConfig:
    capacity_bytes: int = _size(1 << 30)
    policy: str = "adaptive"  # LRU until its own sampled simulations show use counts pay (issue 7)
    verify_reads: bool = True  # checksum each section after copying it to the caller


@dataclass(slots=True, frozen=True)
class DiskTierConfig:
    root: str = ""
    capacity_bytes: int = _size(16 << 30)
    policy: str = "adaptive"
    fsync: bool = False  # fsync before publish: survives power loss, not only process crashes
    read_only: bool = False  # open as a reader of a folder another process owns


REDIS_URL_SCHEMES = ("redis", "rediss", "unix")


@dataclass(slots=True, frozen=True)
class RedisTierConfig:
    """A Redis/Valkey server or Redis Cluster shared by many hosts (tiers/redis.py).

    Capacity and eviction belong to the server (set `maxmemory` and `maxmemory-policy
    allkeys-lru` there); kvtier only bounds how long it waits for it.
    """

    url: str = ""  # redis://[user:password@]host:port[/db], rediss://..., unix:///path.sock
    cluster: bool = False  # url names one node of a Redis Cluster; the others are discovered
    namespace: str = "kvtier"  # prefix of every key kvtier writes
    ttl_s: float = 0.0  # expire each chunk this long after it is written; 0 = never (the server's LRU evicts)
    connect_timeout_s: float = 0.5
    timeout_s: float = 1.0  # longest a command waits for its reply before it counts as a miss
    breaker_failures: int = 3  # consecutive failures that open the circuit breaker
    backoff_s: float = 0.5  # first wait before an open breaker lets one trial through; doubles per failure
    max_backoff_s: float = 10.0
    max_connections: int = 32
    start_degraded: bool = False  # an unreachable server at start: misses until it answers, not an error

    def __post_init__(self) -> None:
        _check_redis_url(self.url)
        if not self.namespace or any(c.isspace() for c in self.namespace):
            raise ConfigError(f"namespace must be a non-empty string without spaces, got {self.namespace!r}")
        if self.cluster and self.url.startswith("unix:"):
            raise ConfigError("cluster: a Redis Cluster is reached over TCP, not a unix socket url")
        for name in ("connect_timeout_s", "timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.ttl_s < 0:
            raise ConfigError(f"ttl_s must be >= 0 (0 = no expiry), got {self.ttl_s!r}")
        if self.breaker_failures <= 0:
            raise ConfigError(f"breaker_failures must be positive, got {self.breaker_failures!r}")
        if self.max_connections <= 0:
            raise ConfigError(f"max_connections must be positive, got {self.max_connections!r}")


def _check_redis_url(url: str) -> None:
    """A ConfigError naming `url` unless it parses as a Redis URL (scheme, host, port, db)."""
    from urllib.parse import urlsplit

    if not url:
        raise ConfigError("url must name the server, e.g. 'redis://127.0.0.1:6379/0'")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"url {url!r} does not parse: {e}") from None
    if parts.scheme not in REDIS_URL_SCHEMES:
        raise ConfigError(f"url {url!r} does not parse: the scheme must be one of {list(REDIS_URL_SCHEMES)}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"url {url!r} does not parse: a unix url needs a socket path")
        return
    if not parts.hostname:
        raise ConfigError(f"url {url!r} does not parse: it names no host")
    if port == 0:
        raise ConfigError(f"url {url!r} does not parse: port 0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"url {url!r} does not parse: the database {db!r} is not a number")


@dataclass(slots=True, frozen=True)
class LowerTierConfig:
    """One tier below DRAM and the first disk tier: exactly one of its kinds is set.

    In a config file: `lower_tiers: [{redis: {url: "redis://host:6379"}}, {disk: {root: ...}}]`.
    `name` labels the tier in lookups and metrics (default: its kind); names are unique.
    """

    name: str = ""
    disk: DiskTierConfig | None = None  # a further folder, e.g. a shared mount
    redis: RedisTierConfig | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in LOWER_TIER_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"set exactly one of {list(LOWER_TIER_KINDS)}, got {kinds or 'none'}")
        if self.disk is not None and not self.disk.root:
            raise ConfigError("disk.root must name a folder")
        if self.name and not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"name {self.name!r} must be letters, digits, '-' or '_'")

    @property
    def kind(self) -> str:
        return next(k for k in LOWER_TIER_KINDS if getattr(self, k) is not None)

    @property
    def tier_name(self) -> str:
        return self.name or self.kind

    @property
    def settings(self) -> Any:
        """The set kind's own config (a DiskTierConfig, a RedisTierConfig, ...)."""
        return getattr(self, self.kind)


# The kinds a lower tier may be, in the order LowerTierConfig checks them (its field names);
# tiers/lower.py maps each to the class that builds the tier.
LOWER_TIER_KINDS = ("disk", "redis")


@dataclass(slots=True, frozen=True)
class StoreConfig:
    chunk_tokens: int = 16
    hash_mode: str = DEFAULT_HASH_MODE
    memory: MemoryTierConfig | None = field(default_factory=MemoryTierConfig)
    disk: DiskTierConfig | None = None
    write_mode: str = "write-through"  # or "write-back": disk written only on DRAM eviction
    promote_on_hit: bool = True
    io_threads: int = 2
    # tiers below DRAM and `disk`, slowest last: each written in the background in chain
    # order (write-through, whatever write_mode says) and promoted from on a hit
    lower_tiers: tuple[LowerTierConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ConfigError(f"store.chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.hash_mode not in HASH_MODES:
            raise ConfigError(f"store.hash_mode {self.hash_mode!r} is unknown; choose one of {sorted(HASH_MODES)}")
        if self.write_mode not in ("write-through", "write-back"):
            raise ConfigError(f"store.write_mode must be 'write-through' or 'write-back', got {self.write_mode!r}")
        if self.io_threads <= 0:
            raise ConfigError(f"store.io_threads must be positive, got {self.io_threads}")
        if self.memory is None and self.disk is None:
            raise ConfigError("store: at least one of store.memory and store.disk must be configured")
        if self.disk is not None and not self.disk.root:
            raise ConfigError("store.disk.root must name a folder")
        self._check_lower_tiers()

    def _check_lower_tiers(self) -> None:
        taken = {"memory": "store.memory", "disk": "store.disk"}
        for i, lower in enumerate(self.lower_tiers):
            if not isinstance(lower, LowerTierConfig):
                raise ConfigError(f"store.lower_tiers[{i}]: expected a LowerTierConfig, got {type(lower).__name__}")
            name = lower.tier_name
            if name in taken:
                raise ConfigError(f"store.lower_tiers[{i}].name: {name!r} is already the name of {taken[name]}; "
                                  "give each tier a distinct name")
            taken[name] = f"store.lower_tiers[{i}]"


def default_cache_dir() -> Path:
    """The user's kvtier cache folder ($XDG_CACHE_HOME/kvtier or ~/.cache/kvtier); CLI use only."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


def _convert(tp: Any, value: Any, key: str, is_size: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key, is_size)
    if is_size:
        return parse_size(value, key)
    if dataclasses.is_dataclass(tp):
        return load_config(tp, value, key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{key}[{i}]", False) for i, v in enumerate(value))
    return value


def load_config(cls: type[T], source: Mapping[str, Any] | str | os.PathLike[str] | None, prefix: str = "") -> T:
    """Build `cls` from a mapping or a .yaml/.yml/.toml/.json file; errors name the key."""
    if source is None:
        source = {}
    if isinstance(source, (str, os.PathLike)):
        source = read_config_file(source)
    if isinstance(source, cls):
        return source
    if not isinstance(source, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(source).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in source.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(fields)}")
        kwargs[name] = _convert(hints[name], value, key, bool(fields[name].metadata.get("size")))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}: {e}") from None
        raise


def read_config_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix == ".json":
        import json

        data = json.loads(text)
    else:
        raise ConfigError(f"config file {p} must end in .yaml, .yml, .toml or .json")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


CLIENT_MODES = ("inprocess", "service")


@dataclass(slots=True, frozen=True)
class ClientConfig:
    """How an engine reaches the store: embedded ("inprocess") or the host's `kvtier serve`.

    In-process mode builds a TieredStore from `store` and `layout`. Service mode connects to
    `socket_path` ("" = kvtier.service's default for this user); the service dictates layout
    and chunk size, and a given `layout` must match it. With `auto_start`, a client that finds
    no service answering starts `python -m kvtier.service --config <service_config>` itself.
    """

    mode: str = "inprocess"
    socket_path: str = ""
    store: StoreConfig = field(default_factory=StoreConfig)
    layout: KVLayout | None = None
    service_config: str = ""  # the service's config file, used by auto_start
    auto_start: bool = False
    lease_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    transfer_threads: int = 2
    transfer_cpus: tuple[int, ...] = ()  # CPUs for the transfer threads; () = those of the starting thread

    def __post_init__(self) -> None:
        if self.mode not in CLIENT_MODES:
            raise ConfigError(f"client.mode must be one of {list(CLIENT_MODES)}, got {self.mode!r}")
        if self.lease_timeout_s <= 0:
            raise ConfigError(f"client.lease_timeout_s must be positive, got {self.lease_timeout_s}")
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"client.connect_timeout_s must be positive, got {self.connect_timeout_s}")
        if self.transfer_threads <= 0:
            raise ConfigError(f"client.transfer_threads must be positive, got {self.transfer_threads}")
        if self.auto_start and self.mode == "service" and not self.service_config:
            raise ConfigError("client.service_config must name the service's config file when auto_start is set")
