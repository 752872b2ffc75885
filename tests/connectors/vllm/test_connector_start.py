"""KVTierConnector refuses bad setups at start, before touching any store (needs vllm importable)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

kv_base = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base", reason="vllm is not installed")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec  # noqa: E402

from kvtier.connectors.vllm.connector import KVTierConnector  # noqa: E402
from kvtier.connectors.vllm.model import UnsupportedModelError  # noqa: E402
from kvtier.core.errors import ConfigError  # noqa: E402


def make(extra: dict[str, Any] | None = None, policy: str = "recompute", sliding_window: int | None = None,
         use_mla: bool = False, is_hybrid: bool = False, dtype: torch.dtype = torch.float32) -> KVTierConnector:
    ktc = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connectors.vllm",
                           kv_role="kv_both", kv_connector_extra_config=extra or {},
                           kv_load_failure_policy=policy)
    model_config = SimpleNamespace(get_sliding_window=lambda: sliding_window, use_mla=use_mla, is_hybrid=is_hybrid)
    vllm_config = SimpleNamespace(
        kv_transfer_config=ktc, model_config=model_config,
        cache_config=SimpleNamespace(block_size=32, cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=dtype)
    kv_cache_config = SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)], num_blocks=8)
    return KVTierConnector(vllm_config, kv_base.KVConnectorRole.SCHEDULER, kv_cache_config)  # type: ignore[arg-type]


def test_fail_policy_is_refused_with_advice() -> None:
    with pytest.raises(ConfigError, match='"kv_load_failure_policy": "recompute"'):
        make(policy="fail")


def test_unknown_extra_config_key_stops_start() -> None:
    with pytest.raises(ConfigError, match="kv_connector_extra_config.chunk_size"):
        make({"chunk_size": 16})


def test_bad_allow_fail_policy_value() -> None:
    with pytest.raises(ConfigError, match="allow_fail_policy"):
        make({"allow_fail_policy": "yes"}, policy="fail")


def test_sliding_window_model_is_refused_at_start() -> None:
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        make(sliding_window=4096)


def test_mla_and_hybrid_models_are_refused_at_start() -> None:
    with pytest.raises(UnsupportedModelError, match="MLA"):
        make(use_mla=True)
    with pytest.raises(UnsupportedModelError, match="hybrid"):
        make(is_hybrid=True)


@pytest.mark.parametrize(("amx", "dtype", "partial"), [
    (True, torch.bfloat16, False),  # vLLM's AMX kernel: a page layout clear_tokens does not know
    (True, torch.float32, True),  # fp32 runs the vec kernel even where AMX is present
    (False, torch.bfloat16, True),
])
def test_partial_chunks_only_where_the_page_layout_is_known(monkeypatch, tmp_path, amx, dtype, partial) -> None:
    import kvtier.connectors.vllm.connector as connector

    monkeypatch.setattr(connector, "cpu_amx_supported", lambda: amx)
    conn = make({"model_fingerprint": "test-model", "store": {"chunk_tokens": 32, "memory": {"capacity_bytes": 1 << 20}}},
                dtype=dtype)
    try:
        assert conn.scheduler is not None
        assert conn.cpu_isa == ("amx" if amx and dtype == torch.bfloat16 else "vec")
        assert conn.scheduler.partial_chunks is partial
    finally:
        conn.shutdown()


def test_cuda_graphs_are_piecewise_so_the_layer_hooks_run() -> None:
    """vLLM forces PIECEWISE CUDA graphs only for a connector that asks: in a FULL graph replay
    wait_for_layer_load and save_kv_layer never run (no wait for a load's copies, saves lost)."""
    assert KVTierConnector.requires_piecewise_for_cudagraph({}) is True
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert KVConnectorBase_V1.requires_piecewise_for_cudagraph({}) is False  # the default kvtier overrides


DETACHED_STARTER = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # a vLLM CPU worker is pinned to its compute cores
from kvtier.connectors.vllm.connector import start_detached_service
start_detached_service(sys.argv[1], sys.argv[2], 30.0)
"""


@pytest.mark.slow  # the starter process imports vLLM (~20 s here)
@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_detached_service_is_not_confined_to_the_vllm_workers_cpus() -> None:
    """Bug: the service started by the worker's connector inherited the worker's pinning to
    vLLM's compute core; lookups then sometimes waited ~1 s for CPU time."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from tests.service.util import cleanup, service_config, wait_until

    folder = tempfile.mkdtemp(prefix="kvt-", dir="/tmp")
    cfg = service_config(folder)
    sock = cfg["socket_path"]
    cfg_path = os.path.join(folder, "svc.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    subprocess.run([sys.executable, "-c", DETACHED_STARTER, sock, cfg_path], check=True, timeout=60)
    pid = int(open(sock + ".lock").read().strip())
    try:
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not os.path.exists(sock))
        time.sleep(0.1)
        cleanup(folder)
