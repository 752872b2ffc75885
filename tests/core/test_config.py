import pytest

from kvtier.core.config import DiskTierConfig, StoreConfig, load_config, parse_size
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
