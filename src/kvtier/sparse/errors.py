"""Errors of the sparse layer; all derive from kvtier's KVTierError."""

from __future__ import annotations

from kvtier.core.errors import ConfigError, KVTierError


class SparseConfigError(ConfigError):
    """A sparse-attention setting is invalid (for example a budget smaller than sinks + window)."""


class BlockMissingError(KVTierError):
    """A block selected at decode is in no tier of the store; attending without it would be wrong."""


class UnsupportedModelError(KVTierError, TypeError):
    """The model's attention is of a kind kvtier's sparse attention does not implement."""


class WorkingSetMemoryError(KVTierError, MemoryError):
    """The device ran out of memory for a working set (its slots are sized by sparse.budget_tokens)."""


class SparseWriteError(KVTierError):
    """A block's KV or summaries could not be written to the store by the background writer."""


class BlocksNotStoredError(SparseWriteError):
    """Blocks of a request were not stored as the store was configured to store them: a tier
    refused them (disk full, no room), failed to write them, or had no slot for them. Decode would
    find those in no tier missing; raised by flush, close and every later append and store read."""
