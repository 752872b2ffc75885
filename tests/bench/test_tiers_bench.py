"""`kvtier bench tiers`: baselines get kvtier's threads, every ratio comes from one call's
numbers, and the hash baseline is vLLM's own function where vLLM is installed."""

from __future__ import annotations

import random

import pytest

from kvtier.bench import tiers


def test_dram_ratios_divide_by_the_same_calls_best_memcpy():
    d = tiers.bench_dram(n=8, runs=2)
    by_threads = d["memcpy_gbps_by_threads"]
    assert set(by_threads) == {"1", str(tiers.IO_THREADS)} and d["io_threads"] == tiers.IO_THREADS
    assert d["memcpy_gbps"] == max(by_threads.values()) == by_threads[str(d["memcpy_threads"])]
    assert d["ratio"] == d["read_gbps"] / d["memcpy_gbps"]
    assert d["ratio_unverified"] == d["read_gbps_unverified"] / d["memcpy_gbps"]
    assert d["layer_scatter_ratio"] == d["layer_scatter_gbps"] / d["memcpy_gbps"]


def test_disk_ratio_divides_by_the_same_calls_best_raw_read(tmp_path):
    k = tiers.bench_disk(n=8, runs=1, root=tmp_path)
    by_threads = k["raw_read_gbps_by_threads"]
    assert set(by_threads) == {"1", str(tiers.IO_THREADS)}
    assert k["raw_read_gbps"] == max(by_threads.values()) == by_threads[str(k["raw_read_threads"])]
    assert k["ratio"] == k["read_gbps"] / k["raw_read_gbps"]


def test_threaded_copy_and_read_move_every_byte(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.arange(10_001, dtype=np.uint8)
    dst = np.zeros_like(src)
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"f{i}"))
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 100)
    bufs = [bytearray(100), bytearray(100)]
    with ThreadPoolExecutor(2) as pool:
        tiers._threaded_copy(pool, dst, src, 2)
        tiers._threaded_read(pool, files, bufs, 2)
    assert np.array_equal(dst, src)
    assert bufs[0] == bytes([1]) * 100 and bufs[1] == bytes([2]) * 100  # files 0-1 on one thread, 2 on the other


def test_hash_baseline_is_vllms_own_function_and_the_recreation_matches_it():
    pytest.importorskip("vllm")
    from vllm.v1.core import kv_cache_utils

    own = tiers.vllm_block_hasher()
    assert own is not None and own[1].startswith("vLLM ") and "hash_block_tokens" in own[1]
    rng = random.Random(0)
    tokens = [rng.randrange(128256) for _ in range(3 * 128 + 5)]
    recreated = tiers.recreated_vllm_block_hash(bytes(kv_cache_utils.NONE_HASH))
    if "(sha256)" in own[1]:  # the re-creation is of vLLM's default sha256 hash
        assert tiers.block_hashes(recreated, tokens, 128) == tiers.block_hashes(own[0], tokens, 128)
    assert len(tiers.block_hashes(own[0], tokens, 128)) == 3
    r = tiers.bench_hash(runs=1, tokens_per_run=1024)
    assert r["baseline"] == own[1]
