"""--throttle-disk-gbps: a disk tier capped at a read speed, and the planner told about it."""

import time

import numpy as np
import pytest

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout
from kvtier.store.planner import CostEstimates
from kvtier.store.probe import disk_probe, memcpy_probe, tier_id
from kvtier.store.throttle import ReadThrottle, throttle_disk
from kvtier.store.tiered import TieredStore

LAYOUT = KVLayout(2, 2, 8, "float32")


def test_throttle_spaces_reads_at_its_rate():
    throttle = ReadThrottle(1e6)  # 1 MB/s
    t0 = time.perf_counter()
    throttle(20_000, t0)
    throttle(20_000)
    assert time.perf_counter() - t0 >= 0.04 - 1e-3  # 40 kB at 1 MB/s: at least 40 ms, never less


def test_throttle_rejects_non_positive():
    with pytest.raises(ValueError, match="read throttle must be positive"):
        ReadThrottle(0)


def test_throttled_store_reads_slowly_and_planner_knows(tmp_path):
    cfg = StoreConfig(chunk_tokens=4, memory=None, disk=DiskTierConfig(root=str(tmp_path / "d")))
    est = CostEstimates()
    with TieredStore(cfg, LAYOUT) as store:
        lb = store.layer_bytes
        srcs = [[np.full(lb, i + 1, dtype=np.uint8) for _ in range(2)] for i in range(3)]
        keys = [bytes([i]) * 16 for i in range(3)]
        store.save(keys, b"\0" * 16, 0, srcs).wait()
        plain_id = tier_id(store, "disk", "cpu")
        throttle_disk(store, 2 * lb * 3 / 0.05 / 1e9, est)  # all 3 chunks in 50 ms
        capped_id = tier_id(store, "disk", "cpu")
        assert capped_id != plain_id and "throttle" in capped_id
        assert est.bandwidth(capped_id) == pytest.approx(2 * lb * 3 / 0.05) and est.bandwidth(plain_id) is None
        dests = [[np.empty(lb, dtype=np.uint8) for _ in range(2)] for _ in range(3)]
        t0 = time.perf_counter()
        r = store.load(keys, dests).wait()
        assert r.loaded == 3 and time.perf_counter() - t0 >= 0.049
        assert all((d[0] == i + 1).all() for i, d in enumerate(dests))


def test_a_configured_throttle_caps_reads_and_is_the_reported_bandwidth_from_the_start(tmp_path):
    """`disk.read_throttle_gbps` in a store config (a `kvtier serve` behind vLLM) throttles like
    `throttle_disk`, and the tier's read_gbps (what the vLLM scheduler's planner reads from the
    store's stats) is the cap before any read and never above it after."""
    lb = LAYOUT.layer_bytes(4)
    gbps = 2 * lb * 3 / 0.05 / 1e9  # all 3 chunks in 50 ms
    cfg = StoreConfig(chunk_tokens=4, memory=None,
                      disk=DiskTierConfig(root=str(tmp_path / "d"), read_throttle_gbps=gbps))
    with TieredStore(cfg, LAYOUT) as store:
        assert store.read_bandwidths()["disk"] == pytest.approx(gbps)
        assert "throttle" in tier_id(store, "disk", "cpu")
        srcs = [[np.full(lb, i + 1, dtype=np.uint8) for _ in range(2)] for i in range(3)]
        keys = [bytes([i]) * 16 for i in range(3)]
        store.save(keys, b"\0" * 16, 0, srcs).wait()
        dests = [[np.empty(lb, dtype=np.uint8) for _ in range(2)] for _ in range(3)]
        t0 = time.perf_counter()
        assert store.load(keys, dests).wait().loaded == 3
        assert time.perf_counter() - t0 >= 0.049
        assert all((d[0] == i + 1).all() for i, d in enumerate(dests))
        assert 0 < store.read_bandwidths()["disk"] <= gbps * (1 + 1e-9)
        assert store.stats()["disk"]["read_gbps"] == store.read_bandwidths()["disk"]
    with pytest.raises(ConfigError, match="store.disk.read_throttle_gbps"):
        DiskTierConfig(root=str(tmp_path), read_throttle_gbps=-1)
    assert DiskTierConfig(root=str(tmp_path)).read_throttle_gbps == 0  # no cap unless asked


def test_throttle_needs_a_disk_tier():
    with TieredStore(StoreConfig(memory=MemoryTierConfig(capacity_bytes=1 << 20)), LAYOUT) as store:
        with pytest.raises(ValueError, match="no disk tier"):
            throttle_disk(store, 1.0, CostEstimates())


def test_probes_measure_something(tmp_path):
    n, s = memcpy_probe(1 << 20)
    assert n == 1 << 20 and s > 0
    got = disk_probe(str(tmp_path), 1 << 20)
    assert got is not None and got[0] == 1 << 20 and got[1] > 0
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert disk_probe(str(tmp_path / "missing")) is None
