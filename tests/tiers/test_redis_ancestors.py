"""Regression: a Redis tier written through the store got a saved chain's chunks even when it had
lost their parent (the server evicted it), so it held children no lookup could reach. The store now
writes the ancestors Redis lacks first, from DRAM (or the disk tier), as it does for the disk tier;
where no tier above holds one, Redis gets nothing of that chain.
"""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from kvtier.bench.redis_servers import redis_server_available  # noqa: E402
from kvtier.tiers.base import TierWriteError  # noqa: E402
from tests.conftest import payload  # noqa: E402
from tests.tiers.test_redis import ROOT, keys_for, redis_store  # noqa: E402

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server and redis-cli are not installed")


@pytest.fixture
def srv(shared_server):
    shared_server.cli("FLUSHALL")
    return shared_server


def save(store, keys, parent=ROOT, depth=0):
    return store.save(keys, parent, depth, [payload(k) for k in keys])


def test_redis_gets_the_ancestors_it_lost_before_a_saved_child(srv):
    store = redis_store(srv.url)
    redis = store.lower_tiers[0]
    keys = keys_for(5, salt=40)
    save(store, keys[:3]).wait()
    assert redis.delete(keys[2]) and redis.delete(keys[1])  # evicted by the server; DRAM holds them
    save(store, keys[3:], keys[2], 3).wait()
    assert redis.lookup(keys) == 5  # was 1: keys[3] and keys[4] were stored under a gap
    other = redis_store(srv.url)  # another host: the whole prefix from Redis
    assert other.lookup(keys).tiers == ("redis",) * 5
    other.close()
    store.close()


def test_redis_gets_no_orphan_when_an_ancestor_is_nowhere(srv):
    store = redis_store(srv.url)
    redis = store.lower_tiers[0]
    keys = keys_for(4, salt=41)
    save(store, keys[:3]).wait()
    assert redis.delete(keys[2]) and redis.delete(keys[1])
    assert store.memory.delete(keys[1])
    with pytest.raises(TierWriteError, match="neither in redis nor in DRAM"):
        save(store, keys[3:], keys[2], 3).wait()
    assert [redis.contains(k) for k in keys] == [True, False, False, False]  # keys[3] was stored before
    store.close()
