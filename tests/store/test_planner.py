"""The load planner: load exactly the prefix of a hit whose loading beats recomputing it."""

import pytest

from kvtier.store.planner import DECAY, HEAD_MIN_GAIN, CostEstimates, chunks_worth_loading, head_and_loads

MB = 1e6


def test_unknown_compute_loads_everything():
    assert chunks_worth_loading(["memory", "disk"], 10**6, 16, {"memory": 1.0, "disk": 1.0}, None) == 2


def test_unknown_bandwidth_counts_as_paying():
    assert chunks_worth_loading(["disk", "disk"], 10**6, 16, {}, 1e-3) == 2


def test_fast_tier_loaded_slow_tier_recomputed():
    # chunk: 1 MB, 16 tokens at 1 ms each = 16 ms to compute; DRAM 1 GB/s = 1 ms, disk 10 MB/s = 100 ms
    bw = {"memory": 1000 * MB, "disk": 10 * MB}
    assert chunks_worth_loading(["memory"] * 3 + ["disk"] * 2, 10**6, 16, bw, 1e-3) == 3
    assert chunks_worth_loading(["disk"] * 4, 10**6, 16, bw, 1e-3) == 0
    assert chunks_worth_loading(["memory"] * 4, 10**6, 16, bw, 1e-3) == 4


def test_a_slow_chunk_inside_the_prefix_is_loaded_when_the_rest_pays_for_it():
    # per chunk: memory saves 15 ms, disk costs 84 ms more than compute; 6 memory chunks after one disk
    # chunk save 90 ms > 84 ms, so loading all 7 beats stopping before the disk chunk
    bw = {"memory": 1000 * MB, "disk": 10 * MB}
    tiers = ["disk"] + ["memory"] * 6
    assert chunks_worth_loading(tiers, 10**6, 16, bw, 1e-3) == 7
    assert chunks_worth_loading(tiers[:6], 10**6, 16, bw, 1e-3) == 0  # 5 memory chunks save only 75 ms


def test_a_tie_does_not_load():
    # load 16 ms == compute 16 ms: a load must strictly pay
    assert chunks_worth_loading(["disk"], 16 * 10**3, 16, {"disk": 10**6}, 1e-3) == 0


def test_bandwidth_probe_then_measurements_decay_the_probe():
    est = CostEstimates()
    assert est.bandwidth("d") is None
    est.seed_bandwidth("d", 100, 1.0)
    assert est.bandwidth("d") == 100 and est.source("d") == "probe"
    est.observe_load("d", 10, 1.0)
    assert est.bandwidth("d") == pytest.approx((100 * DECAY + 10) / (1.0 * DECAY + 1.0))
    assert est.source("d") == "measured"
    for _ in range(30):
        est.observe_load("d", 10, 1.0)
    assert est.bandwidth("d") == pytest.approx(10, rel=1e-3)


def test_throttle_caps_and_seeds():
    est = CostEstimates()
    est.cap_bandwidth("d", 2e6)
    assert est.bandwidth("d") == 2e6 and est.source("d") == "throttle"
    est.observe_load("d", 1e9, 1.0)  # a page-cached read faster than the cap is still capped
    assert est.bandwidth("d") == 2e6
    with pytest.raises(ValueError, match="positive"):
        est.cap_bandwidth("d", 0)
    with pytest.raises(ValueError, match="positive"):
        est.seed_bandwidth("d", 0, 1.0)


def test_compute_cost_is_decayed_seconds_per_token():
    est = CostEstimates()
    assert est.seconds_per_token("m") is None
    est.observe_compute("m", 100, 0.2)
    assert est.seconds_per_token("m") == pytest.approx(0.2 / 100)
    est.observe_compute("m", 1000, 1.0)
    assert est.seconds_per_token("m") == pytest.approx((0.2 * DECAY + 1.0) / (100 * DECAY + 1000))
    for _ in range(40):
        est.observe_compute("m", 50, 0.5)
    assert est.seconds_per_token("m") == pytest.approx(0.01, rel=1e-4)


def test_zero_observations_are_ignored():
    est = CostEstimates()
    est.observe_load("d", 0, 1.0)
    est.observe_compute("m", 10, 0.0)
    assert est.bandwidth("d") is None and est.seconds_per_token("m") is None
    assert est.snapshot() == {}


def test_head_and_loads_splits_where_loading_and_computing_take_as_long():
    # 8 chunks, each 1 ms to load and 1 ms to compute: serial is 8 ms either way, the head 4 + the tail 4 in parallel
    assert head_and_loads(["disk"] * 8, 10**6, 16, {"disk": 1e9}, 1e-3 / 16) == (4, 8)
    # loading twice as slow: compute 2/3 of the prefix while the last third loads
    assert head_and_loads(["disk"] * 9, 10**6, 16, {"disk": 5e8}, 1e-3 / 16) == (6, 9)


def test_head_and_loads_keeps_the_serial_plan_where_a_head_gains_little():
    # a disk 40x slower than compute (the CPU check at 2 MB/s): a head of 31 chunks beside one loaded
    # chunk would gain 2%, within the estimates' noise
    assert head_and_loads(["disk"] * 32, 16384, 16, {"disk": 2e6}, 0.2e-3 / 16) == (0, 0)
    # ... the same disk beside a compute 10x slower (a loaded machine): a 17% gain, planned
    assert head_and_loads(["disk"] * 32, 16384, 16, {"disk": 2e6}, 2.0e-3 / 16)[0] > 0
    # loading 100x cheaper than computing (DRAM on a CPU): load everything, no head
    assert head_and_loads(["memory"] * 8, 10**6, 16, {"memory": 1e11}, 1e-3 / 16) == (0, 8)
    # no compute estimate yet, or one chunk: today's plan
    assert head_and_loads(["disk"] * 8, 10**6, 16, {"disk": 1e9}, None) == (0, 8)
    assert head_and_loads(["disk"], 10**6, 16, {"disk": 1e6}, 1e-3 / 16) == (0, 0)
    # far too slow to load anything in time: recompute
    assert head_and_loads(["disk"] * 8, 10**6, 16, {"disk": 1e3}, 1e-3 / 16) == (0, 0)


def test_head_and_loads_matches_an_exhaustive_search():
    import random

    rng = random.Random(3)
    for _ in range(500):
        tiers = [rng.choice(["memory", "disk", "redis"]) for _ in range(rng.randint(2, 10))]
        bw = {"memory": rng.choice([None, 1e8, 1e9]), "disk": rng.uniform(1e5, 1e9), "redis": rng.uniform(1e5, 1e9)}
        spt = rng.choice([1e-6, 1e-5, 1e-4])
        k, n = head_and_loads(tiers, 10**4, 16, bw, spt)
        c = 16 * spt
        load = [10**4 / bw[t] if bw[t] else 0.0 for t in tiers]
        u = len(tiers)

        def cost(k, n, c=c, load=load, u=u):
            return (max(k * c, sum(load[k:n])) if k else sum(load[:n])) + (u - n) * c

        serial = chunks_worth_loading(tiers, 10**4, 16, bw, spt)
        heads = [(a, b) for b in range(2, u + 1) for a in range(1, b)]
        threshold = min(cost(0, serial) - c, cost(0, serial) * (1 - HEAD_MIN_GAIN))
        if any(cost(*h) == pytest.approx(threshold, rel=1e-9) for h in heads):
            continue  # a tie with the margin: rounding decides either way
        allowed = [h for h in heads if cost(*h) < threshold]
        want = min(allowed, key=lambda h: cost(*h)) if allowed else (0, serial)
        assert cost(k, n) == pytest.approx(cost(*want), rel=1e-9, abs=1e-15)


def test_a_head_must_gain_more_than_its_measured_overhead():
    est = CostEstimates()
    est.observe_head("e", 64, 0.5)  # no compute estimate yet: nothing to measure the overhead against
    assert est.head_overhead("e") is None
    est.observe_compute("e", 1000, 1.0)  # 1 ms per token
    est.observe_head("e", 64, 0.064 + 0.010)  # 10 ms beyond its tokens
    assert est.head_overhead("e") == pytest.approx(0.010)
    est.observe_head("e", 64, 0.030)  # faster than estimated: no negative overhead
    assert 0 < est.head_overhead("e") < 0.010
    # 8 chunks of 16 tokens at 1 ms per token, loads as slow: a head saves 64 ms
    args = (["disk"] * 8, 10**6, 16, {"disk": 10**6 / 0.016}, 1e-3)
    assert head_and_loads(*args, head_overhead_s=0.050) == (4, 8)
    assert head_and_loads(*args, head_overhead_s=0.070) == (0, 0)
    est.forget()
    assert est.head_overhead("e") is None
