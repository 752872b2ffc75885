"""Hugging Face transformers connector: a store-backed prefix Cache, and sparse attention ("kvtier_sparse").

Prefix reuse (connector.py, cache.py):

    conn = TransformersConnector(model, store)              # store: TieredStore or StoreClient
    out = kvtier_generate(model, input_ids, conn, max_new_tokens=32)
    cache, out = conn.prefill(input_ids)                     # one forward, stored prefix loaded
    plan = conn.new_cache().prepare(input_ids)               # the raw contract, see cache.py

Every difference between transformers versions lives in compat.py. Sparse attention lives in
sparse.py (import kvtier.connectors.transformers.sparse).
"""

from kvtier.connectors.transformers.cache import KVTierCache, PrefillPlan, PrefixLoadError
from kvtier.connectors.transformers.compat import UnsupportedModelError, cache_kwarg, check_full_kv
from kvtier.connectors.transformers.connector import TransformersConnector, kvtier_generate
from kvtier.connectors.transformers.identity import model_identity, model_layout

__all__ = ["KVTierCache", "PrefillPlan", "PrefixLoadError", "TransformersConnector", "UnsupportedModelError",
           "cache_kwarg", "check_full_kv", "kvtier_generate", "model_identity", "model_layout"]
