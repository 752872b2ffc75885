"""Metrics on prometheus-client: per-store registries, exact values, histograms once per batch,
an in-process store's /metrics, and a metrics port already taken."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.core import metrics as m
from tests.store.test_tiered import keys_for, load_all, make_store, save_chain


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_each_metrics_has_its_own_registry():
    a, b = m.Metrics(), m.Metrics()
    a.inc(m.HITS, 3, tier="memory")
    b.inc(m.HITS, 5, tier="memory")  # the same name in another store: no collision
    assert a.get(m.HITS, tier="memory") == 3 and b.get(m.HITS, tier="memory") == 5
    assert a.registry is not b.registry
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value(m.HITS, {"tier": "memory"}) is None  # never the global one


def test_kinds_values_and_text():
    x = m.Metrics()
    x.inc(m.HITS, 2, tier="disk")
    x.counter(m.HITS, tier="disk").inc(1)
    x.set(m.USED_BYTES, 4096, tier="disk")
    x.observe(m.LOOKUP_LATENCY, 0.002, tier="disk")
    x.observe(m.LOOKUP_LATENCY, 0.004, tier="disk")
    assert x.get(m.HITS, tier="disk") == 3
    assert x.get(m.HITS, tier="memory") == 0
    assert x.get(m.USED_BYTES, tier="disk") == 4096
    assert x.get(m.LOOKUP_LATENCY + "_count", tier="disk") == 2
    assert x.get(m.LOOKUP_LATENCY + "_sum", tier="disk") == pytest.approx(0.006)
    fam = families(x.render_prometheus())
    assert fam["kvtier_tier_hits"].type == "counter"
    assert fam[m.USED_BYTES].type == "gauge"
    assert fam[m.LOOKUP_LATENCY].type == "histogram"
    snap = x.snapshot()
    assert snap['kvtier_tier_hits_total{tier="disk"}'] == 3
    assert snap['kvtier_tier_lookup_latency_seconds_count{tier="disk"}'] == 2


def test_a_name_used_with_other_labels_is_an_error_naming_it():
    x = m.Metrics()
    x.inc(m.HITS, tier="memory")
    with pytest.raises(ValueError, match=m.HITS):
        x.inc(m.HITS, connector="vllm")


def test_store_histograms_are_observed_once_per_batch(tmp_path):
    store = make_store(tmp_path, mem_chunks=16)
    keys = keys_for(list(range(8 * 4)))  # 8 chunks
    save_chain(store, keys).wait()
    store.flush()
    assert store.lookup(keys).hits == 8
    res, _ = load_all(store, keys)
    assert res.loaded == 8
    get = store.metrics.get
    assert get(m.LOOKUP_LATENCY + "_count", tier="memory") == 1  # one batch of 8 chunks
    assert get(m.LOAD_LATENCY + "_count", tier="memory") == 1
    assert get(m.SAVE_LATENCY + "_count", tier="memory") == 1
    assert get(m.SAVE_LATENCY + "_count", tier="disk") == 1  # the write-through batch
    assert get(m.CAPACITY_BYTES, tier="memory") == 16 * store.layout.chunk_bytes(store.chunk_tokens)
    assert get(m.CAPACITY_BYTES, tier="disk") == 1 << 30
    assert get(m.USED_BYTES, tier="memory") == 8 * store.layout.chunk_bytes(store.chunk_tokens)
    store.close()


def test_in_process_store_serves_its_metrics_until_closed(tmp_path):
    store = make_store(tmp_path)
    port = store.serve_metrics(0)
    keys = keys_for(list(range(12)))
    save_chain(store, keys).wait()
    store.lookup(keys)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    fam = families(text)
    hist = fam[m.LOOKUP_LATENCY]
    counts = {s.labels["tier"]: s.value for s in hist.samples if s.name.endswith("_count")}
    assert counts == {"memory": 1.0}
    store.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_in_use_is_a_clear_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        store = make_store(tmp_path)
        with pytest.raises(m.MetricsPortInUseError, match=f"metrics_port {port}: 127.0.0.1:{port} is already in use"):
            store.serve_metrics(port)
        assert store.metrics.served_port is None
        assert store.serve_metrics(0) != port  # the store still works and can serve elsewhere
        store.close()


def test_null_metrics_record_nothing():
    x = m.NullMetrics()
    x.inc(m.HITS, 3, tier="memory")
    x.counter(m.HITS, tier="memory").inc()
    x.set(m.USED_BYTES, 1, tier="memory")
    x.observe(m.LOOKUP_LATENCY, 0.1, tier="memory")
    assert x.get(m.HITS, tier="memory") == 0 and x.snapshot() == {}


def test_service_with_metrics_off_and_a_metrics_port_is_an_error_naming_both():
    from kvtier.core.config import load_config
    from kvtier.service.config import ServiceConfig

    layout = {"num_layers": 1, "num_kv_heads": 1, "head_size": 8, "dtype": "float32"}
    with pytest.raises(ValueError, match="service.metrics_port 9464 is set but service.metrics is false"):
        load_config(ServiceConfig, {"layout": layout, "metrics": False, "metrics_port": 9464})
    assert not load_config(ServiceConfig, {"layout": layout, "metrics": False}).metrics


def test_scrapes_racing_an_in_process_store_close_raise_nothing(tmp_path, capfd):
    import threading
    import urllib.error

    from tests.service.util import wait_until

    store = make_store(tmp_path)
    port = store.serve_metrics(0)
    keys = keys_for(list(range(12)))
    save_chain(store, keys).wait()
    stop = threading.Event()
    answered: list[int] = []
    unexpected: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                answered.append(1)
            except (OSError, urllib.error.URLError):
                pass  # the server is gone: that is fine
            except BaseException as e:  # noqa: BLE001 - anything else fails the test below
                unexpected.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(answered) >= 6)  # scrapes are being served when the close comes
    store.close()  # stops serving first, then closes the tiers
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert answered and not unexpected
    assert "Traceback" not in capfd.readouterr().err
