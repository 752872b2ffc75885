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
    policy: str = "guarded"  # adaptive (issue 7) that falls back to exact LRU while an LRU shadow hits more (issue 16)
    verify_reads: bool = True  # checksum each section after copying it to the caller


@dataclass(slots=True, frozen=True)
class DiskTierConfig:
    root: str = ""
    capacity_bytes: int = _size(16 << 30)
    policy: str = "guarded"
    fsync: bool = False  # fsync before publish: survives power loss, not only process crashes
    read_only: bool = False  # open as a reader of a folder another process owns


@dataclass(slots=True, frozen=True)
class StoreConfig:
    chunk_tokens: int = 16
    hash_mode: str = DEFAULT_HASH_MODE
    memory: MemoryTierConfig | None = field(default_factory=MemoryTierConfig)
    disk: DiskTierConfig | None = None
    write_mode: str = "write-through"  # or "write-back": disk written only on DRAM eviction
    promote_on_hit: bool = True
    io_threads: int = 2

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
