"""kvtier.bench.redis on a tiny run: every figure is there and every loaded byte was verified."""

import pytest

pytest.importorskip("redis")

from kvtier.bench.redis import run_redis_payload  # noqa: E402
from kvtier.bench.redis_servers import redis_server_available  # noqa: E402


@pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")
def test_redis_payload_smoke():
    result = run_redis_payload(quiet=True, chunks=8, batch=4, threads=1, runs=1)
    for part in ("single", "cluster", "serve"):
        assert result[part]["verified"] is True
    assert result["serve"]["share_from_redis"] > 0
    for name in ("load_ratio", "load_ratio_single", "serve_load_ratio", "tier_load_ratio", "tier_load_ratio_cluster",
                 "lookups_per_s", "lookups_per_s_cluster"):
        assert result[name] > 0
    # the judged load_ratio is the like-for-like one: the tier against redis-py GETs on the cluster
    assert result["load_ratio"] == result["tier_load_ratio_cluster"]
    assert result["load_ratio_single"] == result["tier_load_ratio"]
    assert "redis-py" in result["load_ratio_measures"] and "not like-for-like" in result["serve_load_ratio_measures"]
    assert set(result["target"]) == {"load_ratio", "lookups_per_s", "met"}
