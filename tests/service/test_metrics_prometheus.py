"""Every panel of dashboards/kvtier.json answers through a real Prometheus scraping a real
`kvtier serve` under load (the dashboard is only worth having if its queries return data)."""

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


def test_dashboard_panels_are_queries_prometheus_can_parse():
    queries = panel_queries()
    assert len(queries) >= 8
    titles = " ".join(t for t, _ in queries).lower()
    for needed in ("hit ratio", "tokens served", "bytes moved", "latency", "fill", "failures"):
        assert needed in titles
    assert any("histogram_quantile" in e for _, e in queries)
    assert all("$" not in e for _, e in queries)  # every variable has a value above


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (apt-get install prometheus; .ci/run does)")
def test_every_dashboard_panel_returns_data_through_prometheus():
    folder = short_tmpdir()
    metrics_port, prom_port = free_port(), free_port()
    svc = ServiceProcess(service_config(folder, disk=True, metrics_port=metrics_port), folder).start()
    prom_cfg = os.path.join(folder, "prometheus.yml")
    Path(prom_cfg).write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kvtier\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
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
            rounds += 1
            for title, expr in list(missing.items()):
                try:
                    if query(prom_port, expr):
                        del missing[title]
                except OSError:  # Prometheus is still starting
                    break
            time.sleep(0.5)
        assert not missing, f"panels with no data after {rounds} rounds of load: {missing}"
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        svc.stop()
        cleanup(folder)
