"""`kvtier serve`'s /metrics over real HTTP: histograms per tier, a port already taken, and
scrapes racing the shutdown."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.core import metrics as m
from tests.service.util import (
    ServiceProcess,
    cleanup,
    exact,
    new_dests,
    save_chain,
    service_config,
    short_tmpdir,
    wait_until,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def run_load(service: ServiceProcess, rounds: int = 3) -> None:
    """A few saves, lookups and loads through a ServiceClient, each checked."""
    c = service.client()
    try:
        root = c.namespace("metrics").root()
        for r in range(rounds):
            keys = c.chunk_keys(root, list(range(r * 1000, r * 1000 + 16)))
            save_chain(c, keys, root).wait()
            c.flush()
            assert c.lookup(keys).hits == 4
            dests = new_dests(4)
            assert c.load(keys, dests).wait().loaded == 4
            assert exact(keys, dests)
            assert c.lookup(c.chunk_keys(root, [7, 7, 7, 7])).hits == 0  # a miss too
    finally:
        c.close()


@pytest.fixture()
def folder():
    f = short_tmpdir()
    yield f
    cleanup(f)


def test_serve_exposes_a_histogram_family_per_tier(folder):
    port = free_port()
    with ServiceProcess(service_config(folder, disk=True, metrics_port=port), folder) as svc:
        run_load(svc)
        fams = {f.name: f for f in text_string_to_metric_families(scrape(port))}
    histograms = [f for f in fams.values() if f.type == "histogram"]
    tiers_with_histograms = {s.labels["tier"] for f in histograms for s in f.samples if "tier" in s.labels}
    assert tiers_with_histograms == {"memory", "disk"}
    lookups = {s.labels["tier"]: s.value for s in fams[m.LOOKUP_LATENCY].samples if s.name.endswith("_count")}
    assert lookups["memory"] == 6  # 3 rounds x (a hit + a miss): one observation per batch
    saves = {s.labels["tier"]: s.value for s in fams[m.SAVE_LATENCY].samples if s.name.endswith("_count")}
    assert saves == {"memory": 3.0, "disk": 3.0}
    hits = {s.labels["tier"]: s.value for s in fams["kvtier_tier_hits"].samples if s.name.endswith("_total")}
    assert hits["memory"] == 12  # 3 loads of 4 chunks from DRAM, counted by the service
    served = {s.labels["tier"]: s.value for s in fams["kvtier_tier_served_tokens"].samples if s.name.endswith("_total")}
    assert served["memory"] == 12 * 4
    assert {"kvtier_service_clients", "kvtier_service_free_slots", m.CAPACITY_BYTES} <= fams.keys()


def test_serve_with_its_metrics_port_taken_fails_naming_it(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        svc = ServiceProcess(service_config(folder, metrics_port=port), folder)
        with pytest.raises(RuntimeError) as err:
            svc.start()
    text = str(err.value)
    assert "exited with 2" in text
    assert f"metrics_port {port}: 127.0.0.1:{port} is already in use" in text
    assert "Traceback" not in text


def test_scrapes_during_shutdown_raise_nothing_in_the_service(folder):
    port = free_port()
    svc = ServiceProcess(service_config(folder, disk=True, metrics_port=port), folder).start()
    run_load(svc, rounds=1)
    stop = threading.Event()
    answered: list[int] = []
    refused: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                scrape(port)
                answered.append(1)
            except (OSError, urllib.error.URLError) as e:  # the server is gone: that is fine
                refused.append(type(e).__name__)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(answered) >= 8)  # scrapes are being served when the stop comes
    out = svc.stop()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert svc.proc is not None and svc.proc.returncode == 0, out
    assert "Traceback" not in out and "Exception" not in out, out
    assert answered and refused  # scrapes were served before, and turned away after, the stop
