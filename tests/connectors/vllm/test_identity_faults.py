"""What the vLLM connector keys KV by, and its stats file, as an audit found them wrong:

- LoRA adapters were keyed by name alone, so two adapters of one name (other paths, or one
  rebuilt with other weights under a persistent store) shared KV; vLLM's own block hashes take
  name and path;
- a hub model vLLM downloaded to --download-dir was fingerprinted by id and revision alone;
- an unwritable stats_path raised out of vLLM's schedule() and stopped the engine;
- the scheduler kept a namespace root for every cache_salt it ever saw.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

from kvtier.connectors.vllm.config import load_connector_config
from kvtier.connectors.vllm.fingerprint import lora_extras, vllm_model_fingerprint
from kvtier.core.errors import ConfigError
from tests.connectors.vllm.sim import FakeLora, FakeRequest, Sim

PROMPT = list(range(100, 113))  # three whole chunks of 4 and one token


def adapter(folder, weights: bytes) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
        f.write(len(b"{}").to_bytes(8, "little") + b"{}" + weights)
    return str(folder)


def saved_by(sim: Sim, name: str, lora: FakeLora) -> None:
    r = FakeRequest(name, PROMPT, lora_request=lora)
    sim.admit(r)
    sim.step({r: 13})
    sim.finish(r)


def test_lora_adapters_are_keyed_by_name_and_weights(tmp_path) -> None:
    lora_extras.cache_clear()
    v1 = adapter(tmp_path / "v1", b"adapter one" * 50)
    v2 = adapter(tmp_path / "v2", b"adapter two" * 50)
    sim = Sim()
    saved_by(sim, "a", FakeLora("support-bot", 1, v1))
    # the same adapter under another id (another engine's numbering): its KV
    assert sim.admit(FakeRequest("b", PROMPT, lora_request=FakeLora("support-bot", 9, v1))) == 12
    # one name, another adapter: none of it (12 hits before)
    assert sim.admit(FakeRequest("c", PROMPT, lora_request=FakeLora("support-bot", 2, v2))) == 0
    assert sim.admit(FakeRequest("d", PROMPT)) == 0  # no adapter: the base model's namespace
    # copies of one adapter at two paths (two hosts) share their KV: the weights are what counts
    copy = adapter(tmp_path / "copy-of-v1", b"adapter one" * 50)
    assert lora_extras("support-bot\n" + copy) == lora_extras("support-bot\n" + v1)
    # v1 rebuilt in place with other weights, seen by a new process (a persistent store): other KV
    before = lora_extras("support-bot\n" + v1)
    adapter(tmp_path / "v1", b"retrained!!" * 50)
    lora_extras.cache_clear()
    assert lora_extras("support-bot\n" + v1) != before
    assert lora_extras("") == ("lora=",)  # requests without an adapter keep their namespace


def _hub_cache(root, weights: bytes) -> None:
    repo = os.path.join(root, "models--org--tiny")
    snap = os.path.join(repo, "snapshots", "abc123")
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("abc123")
    with open(os.path.join(snap, "config.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(snap, "model.bin"), "wb") as f:
        f.write(weights)


def _vllm_config(download_dir):
    mc = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: {"model_type": "llama"}), dtype="float32",
                         quantization=None, model="org/tiny", revision=None)
    return SimpleNamespace(model_config=mc, cache_config=SimpleNamespace(cache_dtype="auto"),
                           load_config=SimpleNamespace(download_dir=download_dir))


def test_a_model_in_vllms_download_dir_is_fingerprinted_by_its_weights(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-default-cache"))
    download = tmp_path / "dl"
    _hub_cache(str(download), b"old weights" * 100)
    old = vllm_model_fingerprint(_vllm_config(str(download)))
    _hub_cache(str(download), b"NEW weights" * 100)
    assert vllm_model_fingerprint(_vllm_config(str(download))) != old  # equal before: id and revision only
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.vllm.fingerprint"):
        vllm_model_fingerprint(_vllm_config(str(tmp_path / "nowhere")))
    assert "were not found on this host" in caplog.text


def test_stats_path_is_checked_at_start_and_a_failed_write_is_a_warning(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("vllm")
    from kvtier.connectors.vllm.connector import KVTierConnector

    with pytest.raises(ConfigError, match="stats_path"):
        load_connector_config({"stats_path": str(tmp_path / "no-such-dir" / "stats.json")}, 4)
    path = tmp_path / "stats.json"
    cfg = load_connector_config({"stats_path": str(path)}, 4)
    sim = Sim()
    fake = SimpleNamespace(scheduler=sim.sched, config=cfg, chunk_tokens=4, _stats_failed=False)
    KVTierConnector._write_stats(fake)  # type: ignore[arg-type]
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    real = os.replace

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="kvtier.connectors.vllm"):
        for _ in range(3):
            KVTierConnector._write_stats(fake)  # type: ignore[arg-type]  # raised out of schedule() before
    monkeypatch.setattr(os, "replace", real)
    assert caplog.text.count("cannot write stats_path") == 1 and not list(tmp_path.glob("*.tmp"))
    KVTierConnector._write_stats(fake)  # type: ignore[arg-type]
    assert fake._stats_failed is False


def test_the_schedulers_namespace_roots_are_bounded(monkeypatch) -> None:
    pytest.importorskip("vllm")
    from kvtier.client.api import InProcessClient
    from kvtier.connectors.vllm import connector
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore
    from tests.connectors.vllm.test_connector_start import make

    def open_client(cfg, layout, first, cpus=()):
        sc = StoreConfig(chunk_tokens=cfg.store.chunk_tokens,
                         memory=MemoryTierConfig(capacity_bytes=64 * layout.chunk_bytes(cfg.store.chunk_tokens)))
        return InProcessClient(TieredStore(sc, layout))

    monkeypatch.setattr(connector, "open_client", open_client)
    monkeypatch.setattr(connector, "MAX_ROOTS", 50)
    conn = make({"model_fingerprint": "m"})
    try:
        assert conn.scheduler is not None
        first = conn.scheduler.root_for("salt-0", "")
        for i in range(200):  # every user with a cache_salt of its own
            conn.scheduler.root_for(f"salt-{i}", "")
        roots = next(c.cell_contents for c in conn.scheduler.root_for.__closure__  # type: ignore[union-attr]
                     if isinstance(c.cell_contents, dict))
        assert len(roots) == 50  # 200 kept before
        assert conn.scheduler.root_for("salt-0", "") == first  # made again, the same
    finally:
        conn.shutdown()  # (its store client, and the thread renewing its leases)


def test_reset_cache_moves_the_scheduler_to_keys_of_its_own(monkeypatch) -> None:
    """vLLM's reset_prefix_cache(reset_connector=True) after an in-place weight update (RL training):
    the connector did not implement reset_cache, so vLLM took it for done, and the old weights' KV
    went on being loaded for the new weights."""
    pytest.importorskip("vllm")
    from kvtier.client.api import InProcessClient
    from kvtier.connectors.vllm import connector
    from kvtier.core.config import MemoryTierConfig, StoreConfig
    from kvtier.store.tiered import TieredStore
    from tests.connectors.vllm.test_connector_start import make

    def open_client(cfg, layout, first, cpus=()):
        sc = StoreConfig(chunk_tokens=cfg.store.chunk_tokens,
                         memory=MemoryTierConfig(capacity_bytes=64 * layout.chunk_bytes(cfg.store.chunk_tokens)))
        return InProcessClient(TieredStore(sc, layout))

    monkeypatch.setattr(connector, "open_client", open_client)
    conn = make({"model_fingerprint": "m"})
    try:
        assert conn.scheduler is not None
        before = conn.scheduler.root_for("", "")
        salted = conn.scheduler.root_for("tenant", "")
        assert conn.reset_cache() is True
        after = conn.scheduler.root_for("", "")
        assert after != before and conn.scheduler.root_for("tenant", "") != salted
        assert conn.scheduler.root_for("", "") == after  # stable until the next reset
        assert conn.reset_cache() is True and conn.scheduler.root_for("", "") not in (before, after)
    finally:
        conn.shutdown()


def test_rekey_all_forgets_what_requests_in_flight_stored() -> None:
    sim = Sim()
    r = FakeRequest("a", PROMPT)
    sim.admit(r)
    sim.step({r: 13})
    assert sim.sched.reqs["a"].stored_upto == 3
    assert sim.admit(FakeRequest("b", PROMPT)) == 12
    old_root = sim.sched.reqs["a"].chain.root
    sim.sched.root_for = lambda salt, lora: b"\x01" * 32  # what reset_cache's new epoch does
    sim.sched.rekey_all()
    st = sim.sched.reqs["a"]
    assert st.chain.root != old_root and st.stored_upto == 0
    assert sim.admit(FakeRequest("c", PROMPT)) == 0  # the old keys' KV is not found under the new root
