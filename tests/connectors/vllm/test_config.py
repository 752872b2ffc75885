"""Connector config (kv_connector_extra_config), version checks and the model fingerprint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvtier.connectors.vllm.config import VLLMConnectorConfig, load_connector_config
from kvtier.connectors.vllm.fingerprint import weight_identity
from kvtier.connectors.vllm.version import UnsupportedVLLMError, check_version, parse_version
from kvtier.core.errors import ConfigError


def test_defaults_use_block_size_as_chunk_size() -> None:
    cfg = load_connector_config({}, 32)
    assert cfg == VLLMConnectorConfig(store=cfg.store) and cfg.store.chunk_tokens == 32
    cfg = load_connector_config({"store": {"memory": {"capacity_bytes": "64MiB"}}}, 128)
    assert cfg.store.chunk_tokens == 128 and cfg.store.memory is not None
    assert cfg.store.memory.capacity_bytes == 64 << 20


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="kv_connector_extra_config.sokcet_path"):
        load_connector_config({"sokcet_path": "/tmp/x"}, 32)
    with pytest.raises(ConfigError, match="kv_connector_extra_config.store.memory.capacity"):
        load_connector_config({"store": {"memory": {"capacity": 1}}}, 32)


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match="lease_timeout_s"):
        load_connector_config({"lease_timeout_s": 0}, 32)
    with pytest.raises(ConfigError, match="save_decode"):
        load_connector_config({"save_decode": "yes"}, 32)


def test_chunk_size_must_divide_block_size() -> None:
    with pytest.raises(ConfigError, match="block_size is 32"):
        load_connector_config({"store": {"chunk_tokens": 12}}, 32)
    with pytest.raises(ConfigError, match="block_size is 32"):
        load_connector_config({"store": {"chunk_tokens": 64}}, 32)
    assert load_connector_config({"store": {"chunk_tokens": 8}}, 32).store.chunk_tokens == 8
    assert load_connector_config({}, 32).store.chunk_tokens == 32


def test_version_check() -> None:
    assert parse_version("0.32.0") == (0, 32)
    assert parse_version("0.32.1rc1+cpu") == (0, 32)
    check_version("0.32.0")
    for bad in ("0.31.2", "0.33.0", "1.0.0", "garbage"):
        with pytest.raises(UnsupportedVLLMError, match="0.32"):
            check_version(bad)


def _model(dir_: Path, payload: bytes) -> Path:
    dir_.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (dir_ / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + payload)
    (dir_ / "config.json").write_text('{"hidden_size": 4}')
    return dir_


def test_weight_identity_follows_bytes_not_paths(tmp_path: Path) -> None:
    a = _model(tmp_path / "a", b"\x01" * 16)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert weight_identity(str(a)) == weight_identity(str(copy))
    rebuilt = _model(tmp_path / "rebuilt", b"\x02" * 16)  # same shapes, other weights
    assert weight_identity(str(rebuilt)) != weight_identity(str(a))


def test_weight_identity_of_big_files_samples_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.connectors.vllm.fingerprint as fp

    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(fp, "SAMPLE_BYTES", 64)
    a = _model(tmp_path / "a", bytes(range(256)) * 40)
    b = _model(tmp_path / "b", bytes(range(256)) * 39 + bytes(255 - i for i in range(256)))
    assert weight_identity(str(a)) != weight_identity(str(b))
