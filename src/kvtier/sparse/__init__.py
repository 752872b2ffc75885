"""Sparse attention with KV offload: block summaries, selection policies, a budgeted working set.

    SparseConfig            budget, block size, sinks, window, policy, retrieval stride
    Summarizer              per-block key summaries (min/max, mean, per-key sign hash + norm), stored as SECTION_SUMMARY
    POLICIES / make_policy  dense, streaming, quest, mean, hash, oracle (eval only), quest_mean, quest_share
    WorkingSet              the fast-memory slots of one layer, per KV head; fills only the (block, head)
                            slices that changed
    SparseKV                one request's full KV in a TieredStore plus its working sets (all layers), on the
                            model's device (summaries, selection, slots and attention there; the KV in the store)
    HostStaging             (sparse.staging) the reusable host buffer decode's fetches cross to the device by
    Prefetcher              (sparse.prefetch) each layer's runners-up read ahead for the next step, beside compute
    BackgroundWriter        (sparse.writer) prefill's blocks and summaries written to the store beside compute
    sparse_store_layout     the store layout SparseKV needs: one section per (layer, KV head, K or V)

Engines reach this layer through connectors/ (transformers: attn_implementation="kvtier_sparse").
"""

from kvtier.sparse.config import SparseConfig
from kvtier.sparse.errors import (
    BlockMissingError,
    BlocksNotStoredError,
    SparseConfigError,
    SparseWriteError,
    UnsupportedModelError,
)
from kvtier.sparse.kv import SparseKV, sparse_store_layout
from kvtier.sparse.policies import POLICIES, SelectionPolicy, make_policy
from kvtier.sparse.summary import Summarizer, SummaryTable
from kvtier.sparse.working_set import WorkingSet

__all__ = [
    "POLICIES",
    "BlockMissingError",
    "BlocksNotStoredError",
    "SelectionPolicy",
    "SparseConfig",
    "SparseConfigError",
    "SparseKV",
    "SparseWriteError",
    "Summarizer",
    "SummaryTable",
    "UnsupportedModelError",
    "WorkingSet",
    "make_policy",
    "sparse_store_layout",
]
