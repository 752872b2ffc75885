"""kvtier's vLLM KV connector: a tiered prefix cache (DRAM, disk) for vLLM.

Load it by name: kv_connector "KVTierConnector", kv_connector_module_path
"kvtier.connectors.vllm" (see connector.py for a full --kv-transfer-config). This
package imports vLLM only when the connector class is asked for, so its vLLM-free parts
(scheduler.py, worker.py, layouts.py, model.py) can be used and tested without vLLM.
Supported vLLM versions: see version.py.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVTierConnector"]


def __getattr__(name: str) -> Any:
    if name in ("KVTierConnector", "KVTierConnectorMetadata"):
        from kvtier.connectors.vllm import connector

        return getattr(connector, name)
    raise AttributeError(name)
