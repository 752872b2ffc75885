"""Every panel of dashboards/kvtier.json answers through a real Prometheus scraping a real
`kvtier serve` under load, and an engine's in-process store whose connector skips loads (the
dashboard is only worth having if its queries return data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.service.test_metrics_http import free_port, run_load
from tests.service.util import ServiceProcess, cleanup, service_config, short_tmpdir

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "kvtier.json"
# What Grafana puts in place of the dashboard's variables: a rate window a 1 s scrape fills
# with several samples, and every job.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$job": ".*"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, with Grafana's variables filled in."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def query(prom_port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


class EngineWithSlowDisk:
    """An engine's side, in this process: a TransformersConnector (a tiny model) over an in-process
    store that serves its metrics. The store's disk holds the prompt and reads at 1 kB/s, so the
    load planner recomputes every stored chunk and the connector counts them as loads skipped;
    it saves nothing, so every prefill skips them again."""

    def __init__(self, root: Path) -> None:
        from kvtier.connectors.transformers import TransformersConnector
        from kvtier.store.planner import CostEstimates
        from kvtier.store.throttle import throttle_disk
        from tests.connectors.transformers.prefix_util import make_store, prompt, tiny_model

        self.model = tiny_model()
        self.ids = prompt(self.model.config.vocab_size, 33, seed=5)
        store = make_store(self.model, root)
        TransformersConnector(self.model, store, plan_loads=False).prefill(self.ids)
        store.close()
        self.store = make_store(self.model, root)  # DRAM empty: the prompt's chunks are on disk only
        estimates = CostEstimates()
        throttle_disk(self.store, 1e-6, estimates)
        self.conn = TransformersConnector(self.model, self.store, estimates=estimates, save=False)
        estimates.observe_compute(self.conn.engine_id, 1000, 1e-3)  # 1 us per token
        self.port = self.store.serve_metrics(0)

    def prefill(self) -> None:
        cache, _ = self.conn.prefill(self.ids)
        assert cache.last_plan.skipped_tokens == (32,)

    def close(self) -> None:
        self.store.close()


def test_dashboard_panels_are_queries_prometheus_can_parse():
    queries = panel_queries()
    assert len(queries) >= 8
    titles = " ".join(t for t, _ in queries).lower()
    for needed in ("hit ratio", "tokens served", "bytes moved", "latency", "fill", "failures", "loads skipped"):
        assert needed in titles
    assert any("histogram_quantile" in e for _, e in queries)
    assert all("$" not in e for _, e in queries)  # every variable has a value above


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (apt-get install prometheus; .ci/run does)")
def test_every_dashboard_panel_returns_data_through_prometheus():
    pytest.importorskip("transformers", reason="the engine side of the test runs a transformers connector")
    folder = short_tmpdir()
    metrics_port, prom_port = free_port(), free_port()
    svc = ServiceProcess(service_config(folder, disk=True, metrics_port=metrics_port), folder).start()
    engine = EngineWithSlowDisk(Path(folder, "engine-disk"))
    prom_cfg = os.path.join(folder, "prometheus.yml")
    Path(prom_cfg).write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kvtier\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        "  - job_name: engine\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{engine.port}']\n")
    log = open(os.path.join(folder, "prometheus.log"), "w")  # noqa: SIM115 - closed in finally
    prom = subprocess.Popen(["prometheus", f"--config.file={prom_cfg}",
                             f"--storage.tsdb.path={os.path.join(folder, 'tsdb')}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        missing = dict(panel_queries())
        deadline = time.monotonic() + 90
        rounds = 0
        while missing and time.monotonic() < deadline:
            assert prom.poll() is None, Path(log.name).read_text()[-2000:]
            run_load(svc, rounds=1)  # keep the store busy while Prometheus scrapes it
            engine.prefill()  # and the engine skipping slow loads
            rounds += 1
            for title, expr in list(missing.items()):
                try:
                    if query(prom_port, expr):
                        del missing[title]
                except OSError:  # Prometheus is still starting
                    break
            time.sleep(0.5)
        assert not missing, f"panels with no data after {rounds} rounds of load: {missing}"
        skipped = query(prom_port, 'sum(kvtier_connector_loads_skipped_total{connector="transformers"})')
        assert float(skipped[0]["value"][1]) >= 8  # the skips counted, not only a series at 0
    finally:
        engine.close()
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        svc.stop()
        cleanup(folder)
