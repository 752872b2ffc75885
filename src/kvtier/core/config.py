"""Configuration: one frozen dataclass per component, loaded from a dict, YAML, TOML or JSON.

`load_config(cls, source)` walks the dataclass fields: unknown keys and bad values
raise ConfigError naming the dotted key ("store.disk.capacity_bytes"), and a file the
parser rejects raises ConfigError naming the file and line. Byte sizes accept integers
or strings such as "512MiB", "4GB".

Per-field rules live in the field's metadata (`size_field`, `number_field`, `choice_field`)
and one function, `check_field`, applies them: load_config calls it with the dotted key
as it reads each value, and each config's __post_init__ calls `check_fields` so a config
built directly in code is held to the same rules. Numbers must be finite (no NaN or
infinity) and never booleans. __post_init__ keeps only the rules that join several fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kvtier.core.errors import ConfigError
from kvtier.core.keys import DEFAULT_HASH_MODE, HASH_MODES, MAX_CHUNK_TOKENS
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
        try:
            n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
        except OverflowError:
            raise ConfigError(f"{key}: byte size {value!r} is too large") from None
    else:
        raise ConfigError(f"{key}: expected a byte size such as 1073741824 or '1GiB', got {value!r}")
    if n < 0:
        raise ConfigError(f"{key}: byte size must be >= 0, got {value!r}")
    return n


def size_field(default: int) -> Any:
    """A byte size: an int >= 0, or a string such as '4GiB' when loaded."""
    return field(default=default, metadata={"size": True})


def number_field(default: Any, *, low: float, low_open: bool = False, high: float | None = None,
                 integer: bool | None = None) -> Any:
    """A number in [low, high] (or (low, high] with `low_open`), or a tuple of such numbers.

    Integers only when `integer` is true; by default, when `default` is an int.
    """
    integer = isinstance(default, int) if integer is None else integer
    return field(default=default, metadata={"range": (low, low_open, high), "integer": integer})


def choice_field(default: str, choices: Collection[str]) -> Any:
    """A string field that must be one of `choices`."""
    return field(default=default, metadata={"choices": tuple(choices)})


def _range_text(low: float, low_open: bool, high: float | None) -> str:
    if high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    return f"{'>' if low_open else '>='} {low}"


def check_field(f: dataclasses.Field[Any], value: Any, key: str) -> None:
    """Apply `f`'s declared rule (range, choices; finiteness for numbers) to `value`.

    ConfigError names `key`. Values of other types are the type conversion's business
    (load_config), so a value of the wrong type is reported, not compared.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if f.metadata.get("size") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{key}: expected a byte size >= 0, got {value!r}")
    if "range" in f.metadata:
        low, low_open, high = f.metadata["range"]
        kind = "an integer" if f.metadata["integer"] else "a number"
        wanted = int if f.metadata["integer"] else (int, float)
        if isinstance(value, tuple) and not isinstance(f.default, tuple):
            raise ConfigError(f"{key}: expected {kind} {_range_text(low, low_open, high)}, got {value!r}")
        for v in value if isinstance(value, tuple) else (value,):
            # (an int is finite however large: math.isfinite would overflow on it)
            if isinstance(v, bool) or not isinstance(v, wanted) or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{key}: expected {kind} {_range_text(low, low_open, high)}, got {value!r}")
            if (v <= low if low_open else v < low) or (high is not None and v > high):
                raise ConfigError(f"{key} must be {_range_text(low, low_open, high)}, got {value!r}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(f"{key} {value!r} is unknown; choose one of {list(f.metadata['choices'])}")


def check_fields(config: Any, section: str) -> None:
    """check_field for every field of a config dataclass; keys read `section.field`."""
    for f in dataclasses.fields(config):
        check_field(f, getattr(config, f.name), f"{section}.{f.name}")


# The names tiers.policies registers (core cannot import tiers; tests/core/test_config.py
# checks the two lists agree), so a misspelt policy is refused when the config is read.
EVICTION_POLICY_NAMES = ("adaptive", "arc", "fifo", "guarded", "lrfu", "lru", "s3fifo")
DEFAULT_POLICY = "guarded"  # the memory, disk and shared-folder tiers' default
WRITE_MODES = ("write-through", "write-back")


@dataclass(slots=True, frozen=True)
class MemoryTierConfig:
    capacity_bytes: int = size_field(1 << 30)
    # adaptive (issue 7) that falls back to exact LRU while an LRU shadow hits more (issue 16)
    policy: str = choice_field(DEFAULT_POLICY, EVICTION_POLICY_NAMES)
    verify_reads: bool = True  # checksum each section after copying it to the caller

    def __post_init__(self) -> None:
        check_fields(self, "store.memory")


@dataclass(slots=True, frozen=True)
class DiskTierConfig:
    root: str = ""
    capacity_bytes: int = size_field(16 << 30)
    policy: str = choice_field(DEFAULT_POLICY, EVICTION_POLICY_NAMES)
    fsync: bool = False  # fsync before publish: survives power loss, not only process crashes
    read_only: bool = False  # open as a reader of a folder another process owns
    # a testing aid: reads never go faster than this many GB/s (0: no cap), and the tier reports
    # the cap as its read bandwidth from the start, so the load planner's "never slower than
    # recomputing" shows on any disk (`kvtier bench vllm`'s kvtier_disk_slow run)
    read_throttle_gbps: float = number_field(0.0, low=0)

    def __post_init__(self) -> None:
        check_fields(self, "store.disk")


REDIS_URL_SCHEMES = ("redis", "rediss", "unix")
# The server settings kvtier recommends for a Redis tier (README, tiers/redis.py; the fleet bench's
# `redis` column models exactly these). Sampled LRU with Redis's default 5 samples evicts far from
# LRU order on a prefix cache (kvtier bench fleet: 0.78x one_host at 4 hosts against 0.87x with 64);
# with MiB-sized chunks evictions are few per byte, so the extra samples cost no measurable CPU.
# allkeys-lfu measured worse than allkeys-lru (its minute-grained decay and new keys' start value).
REDIS_RECOMMENDED_SETTINGS: dict[str, str] = {"maxmemory-policy": "allkeys-lru", "maxmemory-samples": "64"}
# How a Redis tier's capacity is managed (RedisTierConfig.mode): "server" (capacity_bytes 0, the
# default: the server's maxmemory and allkeys-lru) or "owner" (capacity_bytes > 0: one owner host
# runs kvtier's eviction policy, fed every host's saves and hits through a Redis Stream). Owner
# mode is recommended: kvtier bench fleet on the Mooncake trace, 4 hosts, against one host with
# their DRAM: 1.06x owner-managed (the shared folder's model), 0.87x the server's sampled LRU,
# 0.89x even an exact LRU; the gain is kvtier's prefix-aware policy, which the server cannot run.
REDIS_MODES = ("server", "owner")
REDIS_RECOMMENDED_MODE = "owner"


@dataclass(slots=True, frozen=True)
class RedisTierConfig:
    """A Redis/Valkey server or Redis Cluster shared by many hosts (tiers/redis.py), in one of two
    modes (REDIS_MODES):

    - server-managed (`capacity_bytes` 0, the default): capacity and eviction belong to the server
      (set `maxmemory`, `maxmemory-policy allkeys-lru` and `maxmemory-samples 64` there:
      REDIS_RECOMMENDED_SETTINGS); kvtier only bounds how long it waits for it.
    - owner-managed (`capacity_bytes` > 0, recommended: REDIS_RECOMMENDED_MODE): every host appends
      its saves and hits to a Redis Stream; the host that sets `owner` (of several, the one holding
      the owner lease) replays it into kvtier's
      eviction policy (`policy`) and deletes victims to keep this tier's chunks within
      `capacity_bytes`. The server then runs with `maxmemory` above capacity_bytes (and the
      stream), allkeys-lru still, as a backstop: while the owner is down nothing is evicted but by
      the server.
    """

    url: str = ""  # redis://[user:password@]host:port[/db], rediss://..., unix:///path.sock
    cluster: bool = False  # url names one node of a Redis Cluster; the others are discovered
    namespace: str = "kvtier"  # prefix of every key kvtier writes
    ttl_s: float = number_field(0.0, low=0)  # expire each chunk this long after it is written; 0 = never (the server's LRU evicts)
    connect_timeout_s: float = number_field(0.5, low=0, low_open=True)
    timeout_s: float = number_field(1.0, low=0, low_open=True)  # longest a command waits for its reply before it counts as a miss
    breaker_failures: int = number_field(3, low=1)  # consecutive failures that open the circuit breaker
    backoff_s: float = number_field(0.5, low=0, low_open=True)  # first wait before an open breaker lets one trial through; doubles per failure
    max_backoff_s: float = number_field(10.0, low=0, low_open=True)
    max_connections: int = number_field(32, low=1)
    start_degraded: bool = False  # an unreachable server at start: misses until it answers, not an error
    # owner-managed mode (capacity_bytes > 0): see the class docstring and tiers/redis_owner.py
    capacity_bytes: int = size_field(0)  # bytes of this tier's chunk values the owner keeps; 0 = server-managed
    owner: bool = False  # replays the access stream and evicts; several may be set: one holds the lease, the others stand by
    owner_lease_s: float = number_field(10.0, low=0, low_open=True)  # an owner that stops renewing its lease is replaced after this
    policy: str = choice_field(DEFAULT_POLICY, EVICTION_POLICY_NAMES)  # the owner's eviction policy
    stream_maxlen: int = number_field(100_000, low=1000)  # access records kept (XADD MAXLEN ~): how far the owner may lag
    flush_s: float = number_field(0.1, low=0, low_open=True)  # period of the access-record flush and the owner's replay
    touch_interval_s: float = number_field(0.0, low=0)  # record a host's hit on a chunk at most once per interval (0: every hit)
    rescan_s: float = number_field(600.0, low=0)  # owner: period of a full rescan of the keys (0: only at start and resync)

    def __post_init__(self) -> None:
        check_fields(self, "redis")
        if not isinstance(self.url, str):
            raise ConfigError(f"redis.url: expected a string such as redis://host:6379, got {self.url!r}")
        _check_redis_url(self.url)
        if not isinstance(self.namespace, str) or not self.namespace or any(c.isspace() for c in self.namespace):
            raise ConfigError(f"namespace must be a non-empty string without spaces, got {self.namespace!r}")
        if self.cluster and self.url.startswith("unix:"):
            raise ConfigError("cluster: a Redis Cluster is reached over TCP, not a unix socket url")
        if 0 < self.ttl_s < 0.001:  # Redis expires in whole milliseconds: it would round to no expiry
            raise ConfigError(f"ttl_s must be 0 (no expiry) or at least 0.001 (1 ms), got {self.ttl_s!r}")
        if self.owner and not self.capacity_bytes:
            raise ConfigError("redis.owner: only an owner-managed tier has an owner; set redis.capacity_bytes > 0 "
                              "(the bytes the owner keeps) or leave owner false")
        if self.capacity_bytes and self.ttl_s:
            raise ConfigError("redis.ttl_s: an owner-managed tier (capacity_bytes > 0) evicts by its policy; chunks "
                              "that expire behind the owner's back would skew its accounting. Set ttl_s 0 or "
                              "capacity_bytes 0")

    @property
    def mode(self) -> str:
        """"owner" (capacity_bytes > 0: kvtier's owner evicts) or "server" (the server's maxmemory evicts)."""
        return "owner" if self.capacity_bytes else "server"


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
    shared_folder: SharedFolderTierConfig | None = None  # a folder several hosts mount

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
LOWER_TIER_KINDS = ("disk", "redis", "shared_folder")


@dataclass(slots=True, frozen=True)
class StoreConfig:
    chunk_tokens: int = number_field(16, low=0, low_open=True, high=MAX_CHUNK_TOKENS)
    hash_mode: str = choice_field(DEFAULT_HASH_MODE, sorted(HASH_MODES))
    memory: MemoryTierConfig | None = field(default_factory=MemoryTierConfig)
    disk: DiskTierConfig | None = None
    # or "write-back": disk written only on DRAM eviction, and at a clean close (what DRAM still holds)
    write_mode: str = choice_field("write-through", WRITE_MODES)
    promote_on_hit: bool = True
    io_threads: int = number_field(2, low=0, low_open=True)
    # tiers below DRAM and `disk`, slowest last: each written in the background in chain
    # order (write-through, whatever write_mode says) and promoted from on a hit
    lower_tiers: tuple[LowerTierConfig, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "store")
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
        # a scalar here is a mistake ({"memory": "4GiB"}), never the name of a file to read
        if not (isinstance(value, Mapping) or dataclasses.is_dataclass(value)):
            names = [f.name for f in dataclasses.fields(tp)]
            raise ConfigError(f"{key}: expected a section (a mapping with keys among {names}), got {value!r}")
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
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int past a float's range
            raise ConfigError(f"{key}: {value!r} is too large") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
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
        check_field(fields[name], kwargs[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix}: {e}") from None
        raise


def read_config_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The mapping in a .yaml/.yml/.toml/.json file; ConfigError naming the file (and line) otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = _parse_yaml(text, p)
    elif suffix == ".toml":
        data = _parse_toml(text, p)
    elif suffix == ".json":
        data = _parse_json(text, p)
    else:
        raise ConfigError(f"config file {p} must end in .yaml, .yml, .toml or .json")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


@functools.cache
def _unique_key_yaml_loader() -> Any:
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: list[Any] = []
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"key {key!r} is given twice",
                        key_node.start_mark)
                seen.append(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_yaml_loader())  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None


def _parse_toml(text: str, path: Path) -> Any:
    # tomllib is in the standard library from Python 3.11; pyproject installs tomli before that
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise ConfigError(f"config file {path}: not valid TOML: {e}") from None


def _parse_json(text: str, path: Path) -> Any:
    import json

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ConfigError(f"config file {path}: key {key!r} is given twice in one object")
            obj[key] = value
        return obj

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") \
            from None


CLIENT_MODES = ("inprocess", "service")


@dataclass(slots=True, frozen=True)
class ClientConfig:
    """How an engine reaches the store: embedded ("inprocess") or the host's `kvtier serve`.

    In-process mode builds a TieredStore from `store` and `layout`. Service mode connects to
    `socket_path` ("" = kvtier.service's default for this user); the service dictates layout
    and chunk size, and a given `layout` must match it. With `auto_start`, a client that finds
    no service answering starts `python -m kvtier.service --config <service_config>` itself.
    """

    mode: str = choice_field("inprocess", CLIENT_MODES)
    socket_path: str = ""
    store: StoreConfig = field(default_factory=StoreConfig)
    layout: KVLayout | None = None
    service_config: str = ""  # the service's config file, used by auto_start
    auto_start: bool = False
    lease_timeout_s: float = number_field(30.0, low=0, low_open=True)
    connect_timeout_s: float = number_field(10.0, low=0, low_open=True)
    # a service that does not answer within this is down: a miss, not a hang
    request_timeout_s: float = number_field(10.0, low=0, low_open=True)
    transfer_threads: int = number_field(2, low=0, low_open=True)
    # CPUs for the transfer threads; () = those of the starting thread
    transfer_cpus: tuple[int, ...] = number_field((), low=0, integer=True)

    def __post_init__(self) -> None:
        check_fields(self, "client")
        if self.auto_start and self.mode == "service" and not self.service_config:
            raise ConfigError("client.service_config must name the service's config file when auto_start is set")


@dataclass(slots=True, frozen=True)
class SharedFolderTierConfig:
    """The disk tier on a folder several hosts mount (tiers/shared_folder.py): exactly one host
    per folder sets `owner` and does capacity accounting and eviction; see the README for the
    NFS mount options it relies on."""

    root: str = ""
    capacity_bytes: int = size_field(64 << 30)
    policy: str = choice_field(DEFAULT_POLICY, EVICTION_POLICY_NAMES)
    fsync: bool = False  # fsync each chunk and its folder before publishing (power-loss safe)
    owner: bool = False  # exactly one host per folder: capacity accounting and eviction
    rescan_s: float = number_field(30.0, low=0)  # owner: period of the background rescan (0: only when rescan() is called)
    revalidate_s: float = number_field(1.0, low=0)  # non-owner: seconds an indexed chunk is trusted before a lookup stats it
    stale_temp_s: float = number_field(3600.0, low=0)  # owner: a temporary file older than this belongs to a crashed writer
    touch_interval_s: float = number_field(1.0, low=0)  # non-owner: at most one mtime update per chunk per interval

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("root must name the shared folder (its mount point, or a folder in it)")
        check_fields(self, "shared_folder")
        if self.capacity_bytes <= 0:
            raise ConfigError(f"shared_folder.capacity_bytes must be positive, got {self.capacity_bytes}")
