"""StoreHost.renew_leases on a tiny pool with a fake clock: a renewed lease outlives its first
deadline, one no longer held is not revived, and every renewal is bounded by max_lease_s."""

import pytest

from kvtier.service.protocol import LeaseError, ServiceError
from tests.service.test_host import Clock, fill, keys, make


def test_a_renewed_lease_keeps_its_chunks_past_its_first_deadline():
    clock = Clock()
    store, host = make(clock=clock)
    a = keys(2)
    fill(host, 1, a)
    _, _, lease = host.lookup(1, a, lease=True, lease_s=5)
    clock.now += 4
    assert host.renew_leases([lease], 5) == [lease]
    clock.now += 4  # 8 s after the lookup
    assert host.expire() == 0
    fill(host, 2, keys(4, start=9000))  # wants every slot
    assert store.memory.lookup(a) == 2  # still pinned
    clock.now += 1.1
    assert host.expire() == 1 and store.memory.slot_counts()["pinned"] == 0


def test_a_lease_no_longer_held_is_not_renewed():
    clock = Clock()
    _, host = make(clock=clock)
    a = keys(3)
    fill(host, 1, a)
    _, _, released = host.lookup(1, a[:1], lease=True, lease_s=5)
    _, _, expired = host.lookup(1, a[1:2], lease=True, lease_s=5)
    _, _, late = host.lookup(1, a[2:], lease=True, lease_s=5)
    host.release(released)
    clock.now += 6
    assert host.expire() == 2  # `late` too
    _, _, held = host.lookup(1, a, lease=True, lease_s=5)
    assert host.renew_leases([released, expired, held, late, 12345], 5) == [held]  # any owner may renew
    with pytest.raises(LeaseError):
        host.release(expired)


def test_a_lease_past_its_deadline_but_not_reaped_still_has_its_pins_and_is_renewed():
    clock = Clock()
    store, host = make(clock=clock)
    a = keys(2)
    fill(host, 1, a)
    _, _, lease = host.lookup(1, a, lease=True, lease_s=5)
    clock.now += 6
    assert store.memory.slot_counts()["pinned"] == 2
    assert host.renew_leases([lease], 5) == [lease]
    assert host.expire() == 0


def test_renewals_are_bounded_by_max_lease_s_and_checked():
    clock = Clock()
    store, host = make(clock=clock)
    host.max_lease_s = 10
    a = keys(1)
    fill(host, 1, a)
    _, _, lease = host.lookup(1, a, lease=True, lease_s=5)
    assert host.renew_leases([lease], 1e9) == [lease]
    clock.now += 10.1
    assert host.expire() == 1
    with pytest.raises(ServiceError, match="hold_s must be positive"):
        host.renew_leases([lease], 0)
    assert host.renew_leases([], 5) == []
