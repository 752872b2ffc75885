import importlib
import json
import math
import sys
import types

import pytest

from kvtier.core.config import (
    EVICTION_POLICY_NAMES,
    ClientConfig,
    DiskTierConfig,
    MemoryTierConfig,
    StoreConfig,
    load_config,
    parse_size,
)
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout, check_block_size


def test_from_dict_nested_and_sizes():
    cfg = load_config(StoreConfig, {"chunk_tokens": 32, "memory": {"capacity_bytes": "64MiB"},
                                    "disk": {"root": "/tmp/x", "capacity_bytes": "2GB"}})
    assert cfg.chunk_tokens == 32
    assert cfg.memory.capacity_bytes == 64 << 20
    assert cfg.disk == DiskTierConfig(root="/tmp/x", capacity_bytes=2 * 10**9)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"chunk_tokns": 16}, "'chunk_tokns'"),
        ({"memory": {"capacity": 1}}, "'memory.capacity'"),
        ({"memory": {"capacity_bytes": "lots"}}, "memory.capacity_bytes"),
        ({"memory": {"capacity_bytes": -1}}, "memory.capacity_bytes"),
        ({"chunk_tokens": "16"}, "chunk_tokens"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"chunk_tokens": True}, "chunk_tokens"),
        ({"hash_mode": "md5"}, "hash_mode"),
        ({"write_mode": "sometimes"}, "write_mode"),
        ({"disk": {"root": ""}}, "disk.root"),
        ({"disk": {"root": "/x", "fsync": "yes"}}, "disk.fsync"),
        ({"memory": None}, "at least one"),
        ({"memory": {"policy": 3}}, "memory.policy"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("'", "'")):
        load_config(StoreConfig, data)


def test_yaml_and_toml_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("chunk_tokens: 64\nmemory:\n  capacity_bytes: 1GiB\n")
    t = tmp_path / "c.toml"
    t.write_text('chunk_tokens = 64\n[memory]\ncapacity_bytes = "1GiB"\n')
    assert load_config(StoreConfig, y) == load_config(StoreConfig, t)
    assert load_config(StoreConfig, y).memory.capacity_bytes == 1 << 30
    bad = tmp_path / "c.ini"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(StoreConfig, bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(StoreConfig, tmp_path / "missing.yaml")


def test_parse_size():
    assert parse_size("1.5KiB", "k") == 1536
    assert parse_size(10, "k") == 10
    assert parse_size("3 mb", "k") == 3_000_000


def test_layout_bytes_and_errors():
    lay = KVLayout(num_layers=12, num_kv_heads=8, head_size=128, dtype="float32")
    assert lay.layer_bytes(16) == 2 * 8 * 128 * 4 * 16
    assert lay.chunk_bytes(16) == 12 * lay.layer_bytes(16)
    assert lay.section_shape(16) == (8, 2, 16, 128)
    assert lay.layout_id(16) != lay.layout_id(32)
    assert lay.layout_id(16) != KVLayout(12, 8, 128, "bfloat16").layout_id(16)
    with pytest.raises(ConfigError, match="layout.dtype"):
        KVLayout(1, 1, 1, dtype="float64")
    with pytest.raises(ConfigError, match="layout.num_layers"):
        KVLayout(0, 1, 1)
    assert check_block_size(64, 16) == 4
    with pytest.raises(ConfigError, match="multiple"):
        check_block_size(24, 16)


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("c.yaml", "chunk_tokens: 16\nmemory: {capacity_bytes: 1GiB\n", r"c\.yaml: not valid YAML at line 3"),
        ("c.yaml", "chunk_tokens: 16\n  memory: x\n", r"c\.yaml: not valid YAML at line 2"),
        ("c.json", '{"chunk_tokens": 16,\n "memory": }', r"c\.json: not valid JSON at line 2, column 12"),
        ("c.toml", "chunk_tokens = 16\n[memory\n", r"c\.toml: not valid TOML: .*line 2"),
        ("c.yaml", "- 1\n- 2\n", r"c\.yaml must hold a mapping at the top level, got list"),
        ("c.yaml", "chunk_tokens: 16\nmemory: {policy: lru}\nmemory: {capacity_bytes: 1GiB}\n",
         r"c\.yaml: not valid YAML at line 3, column 1: key 'memory' is given twice"),
        ("c.json", '{"memory": {"policy": "lru", "policy": "fifo"}}', r"c\.json: key 'policy' is given twice"),
    ],
)
def test_malformed_config_file_is_a_config_error_naming_file_and_line(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(StoreConfig, path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("memory:\n  <<: {policy: lru, capacity_bytes: 1MiB}\n  policy: fifo\n")
    assert load_config(StoreConfig, path).memory == MemoryTierConfig(capacity_bytes=1 << 20, policy="fifo")


def test_binary_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00chunk")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(StoreConfig, path)


def test_toml_reads_with_tomli_where_tomllib_is_missing(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib; pyproject installs tomli there and the loader must use it."""
    tomllib = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")  # the real parser

    calls = []

    def loads(text):
        calls.append(text)
        return tomllib.loads(text)

    fake_tomli = types.ModuleType("tomli")
    fake_tomli.loads = loads
    fake_tomli.TOMLDecodeError = tomllib.TOMLDecodeError
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    path = tmp_path / "c.toml"
    path.write_text("chunk_tokens = 32\n")
    assert load_config(StoreConfig, path).chunk_tokens == 32
    assert calls == ["chunk_tokens = 32\n"]


@pytest.mark.parametrize("section", ["memory", "disk"])
@pytest.mark.parametrize("value", ["4GiB", 4, True, ["lru"]])
def test_section_given_a_scalar_names_the_key_and_is_not_read_as_a_file(tmp_path, monkeypatch, section, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "4GiB").write_text("capacity_bytes: 1\n")  # would be read if the value were taken as a path
    with pytest.raises(ConfigError, match=rf"^{section}: expected a section"):
        load_config(StoreConfig, {section: value})


def test_bad_eviction_policy_is_refused_at_load_naming_key_and_choices():
    with pytest.raises(ConfigError, match=r"memory\.policy 'lfu' is unknown; choose one of \[.*'lru'"):
        load_config(StoreConfig, {"memory": {"policy": "lfu"}})
    with pytest.raises(ConfigError, match=r"disk\.policy 'LRU' is unknown"):
        load_config(StoreConfig, {"disk": {"root": "/x", "policy": "LRU"}})
    with pytest.raises(ConfigError, match=r"store\.memory\.policy 'nope' is unknown"):
        MemoryTierConfig(policy="nope")
    for name in EVICTION_POLICY_NAMES:
        assert load_config(StoreConfig, {"memory": {"policy": name}}).memory.policy == name


def test_config_policy_names_match_the_tier_registry():
    from kvtier.tiers.policies import POLICIES

    assert sorted(EVICTION_POLICY_NAMES) == sorted(POLICIES)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"lease_timeout_s": math.nan}, r"^lease_timeout_s: expected a finite number, got nan"),
        ({"lease_timeout_s": math.inf}, r"^lease_timeout_s: expected a finite number"),
        ({"lease_timeout_s": -1.0}, r"^lease_timeout_s must be > 0"),
        ({"lease_timeout_s": 0}, r"^lease_timeout_s must be > 0"),
        ({"lease_timeout_s": True}, r"^lease_timeout_s: expected a finite number, got True"),
        ({"connect_timeout_s": -math.inf}, r"^connect_timeout_s: expected a finite number"),
        ({"transfer_threads": 0}, r"^transfer_threads must be > 0"),
        ({"transfer_threads": 2.0}, r"^transfer_threads: expected an integer"),
        ({"transfer_cpus": [0, -1]}, r"^transfer_cpus must be >= 0"),
        ({"transfer_cpus": [0, True]}, r"^transfer_cpus\[1\]: expected an integer"),
        ({"mode": "remote"}, r"^mode 'remote' is unknown; choose one of \['inprocess', 'service'\]"),
        ({"store": {"io_threads": -2}}, r"^store\.io_threads must be > 0"),
        ({"store": "big"}, r"^store: expected a section"),
    ],
)
def test_client_numbers_are_finite_and_in_range_naming_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(ClientConfig, data)


def test_nan_from_json_and_yaml_files_is_refused(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"lease_timeout_s": math.nan}))  # json writes the non-standard NaN
    with pytest.raises(ConfigError, match="lease_timeout_s: expected a finite number"):
        load_config(ClientConfig, j)
    y = tmp_path / "c.yaml"
    y.write_text("lease_timeout_s: .nan\n")
    with pytest.raises(ConfigError, match="lease_timeout_s: expected a finite number"):
        load_config(ClientConfig, y)


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda: ClientConfig(lease_timeout_s=math.nan), r"client\.lease_timeout_s: expected a finite number"),
        (lambda: ClientConfig(connect_timeout_s=-1.0), r"client\.connect_timeout_s must be > 0"),
        (lambda: StoreConfig(chunk_tokens=0), r"store\.chunk_tokens must be in \(0, 1048576\]"),
        (lambda: StoreConfig(hash_mode="md5"), r"store\.hash_mode 'md5' is unknown"),
        (lambda: MemoryTierConfig(capacity_bytes=-1), r"store\.memory\.capacity_bytes: expected a byte size"),
        (lambda: DiskTierConfig(root="/x", capacity_bytes=1.5), r"store\.disk\.capacity_bytes: expected a byte size"),
    ],
)
def test_configs_built_in_code_follow_the_same_rules(build, needle):
    with pytest.raises(ConfigError, match=needle):
        build()
