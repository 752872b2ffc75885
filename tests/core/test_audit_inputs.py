"""Inputs an audit found mishandled: each gets a clear error (or the right answer) now."""

from __future__ import annotations

import math

import pytest

from kvtier.core import config as C
from kvtier.core import keys as K
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout
from kvtier.store.planner import CostEstimates, chunks_worth_loading
from kvtier.store.transfer import TransferEngine


def test_a_workers_own_timeout_error_is_raised_as_itself_not_as_a_wait_timeout() -> None:
    """concurrent.futures.TimeoutError is the built-in TimeoutError: a worker's socket or NFS
    timeout was reported as "transfer N did not finish in None s", its message lost."""
    engine = TransferEngine(1, "t")

    def work():
        raise TimeoutError("redis socket timed out")

    handle = engine.submit("save", work)
    handle.exception()
    with pytest.raises(TimeoutError, match="redis socket timed out"):
        handle.wait()
    slow = engine.submit("save", lambda: __import__("time").sleep(0.5))
    with pytest.raises(TimeoutError, match="did not finish in 0.01 s"):
        slow.wait(0.01)
    engine.shutdown()


def _keys(tokens, pure: bool):
    root = K.Namespace("m", b"\0" * 16).root()
    saved = K._c_chain_sha256
    if pure:
        K._c_chain_sha256 = None
    try:
        return K.KeyChain(root, 2).extend(tokens)
    finally:
        K._c_chain_sha256 = saved


def test_bytes_tokens_get_the_same_keys_from_both_hash_loops() -> None:
    tokens = bytes(range(1, 9))
    want = _keys(list(tokens), pure=True)
    assert _keys(tokens, pure=True) == want == _keys(tokens, pure=False) == _keys(bytearray(tokens), pure=True)


def test_nan_or_inf_timings_never_reach_the_planners_estimates() -> None:
    est = CostEstimates()
    est.observe_compute("e", 1000, float("nan"))
    est.observe_compute("e", 1000, float("inf"))
    est.observe_load("disk", 1 << 20, float("nan"))
    assert est.seconds_per_token("e") is None and est.bandwidth("disk") is None
    est.observe_compute("e", 1000, 1.0)
    spt = est.seconds_per_token("e")
    assert spt is not None and math.isfinite(spt)
    assert chunks_worth_loading(["disk"] * 4, 1 << 10, 16, {"disk": est.bandwidth("disk")}, spt) == 4


@pytest.mark.parametrize("build", [
    lambda: C.parse_size("9" * 400, "k"),
    lambda: C.load_config(C.StoreConfig, {"memory": {"capacity_bytes": "9" * 400 + "GiB"}}),
    lambda: C.load_config(C.ClientConfig, {"lease_timeout_s": 10**400}),
    lambda: C.StoreConfig(chunk_tokens=(16,)),
    lambda: C.StoreConfig(chunk_tokens=1 << 30),
    lambda: C.RedisTierConfig(url="redis://h:1", breaker_failures=True),
    lambda: C.RedisTierConfig(url="redis://h:1", timeout_s="1"),
    lambda: C.RedisTierConfig(url=6379),
    lambda: KVLayout(1, 1, 1, dtype=["float16"]),
    lambda: K.Namespace("m", b"\0" * 16, tp_rank=2**32),
    lambda: K.Namespace("m", b"\0" * 16, tp_rank=True),
    lambda: K.KeyChain(K.Namespace("m", b"\0" * 16).root(), 2**40),
])
def test_out_of_range_and_wrong_typed_values_are_config_errors(build) -> None:
    """Before: OverflowError, TypeError, AttributeError, struct.error or MemoryError, or accepted."""
    with pytest.raises(ConfigError):
        build()
