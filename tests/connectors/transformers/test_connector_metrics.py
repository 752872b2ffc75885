"""The transformers connector's series exist from its start, at 0, in the store's registry."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvtier.connectors.transformers import TransformersConnector
from kvtier.core import metrics as m
from tests.connectors.transformers.prefix_util import make_store, tiny_model


def test_connector_counters_are_exposed_at_zero_before_any_request(tmp_path):
    model = tiny_model()
    store = make_store(model, tmp_path)
    TransformersConnector(model, store, plan_loads=False)
    exposed = {(s.name, s.labels.get("connector"), s.value)
               for f in text_string_to_metric_families(store.metrics.render_prometheus()) for s in f.samples}
    for name in m.CONNECTOR_COUNTERS:
        assert (name, "transformers", 0.0) in exposed, name
    assert (m.LOADS_SKIPPED, "transformers", 0.0) in exposed  # the dashboard's "loads skipped" panel reads it
    store.close()
