"""The few exceptions kvtier raises.

Every public error derives from KVTierError so callers can catch one type. Misuse
(bad config, bad arguments) raises; a missing or corrupt chunk is a *miss*, reported
through return values and metrics, never as data.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every kvtier error."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


class LayoutMismatchError(KVTierError, ValueError):
    """A buffer, chunk or engine layout does not match the store's KV layout."""


class CorruptChunkError(KVTierError):
    """A stored chunk failed validation (magic, version, checksum, length)."""


class NewerFormatError(CorruptChunkError):
    """A chunk written in a newer chunk format than this kvtier reads (a host upgraded first, on a
    shared tier): a miss here, and left alone, never deleted as corrupt."""


class StoreClosedError(KVTierError):
    """An operation was attempted on a closed store or tier."""


class TierUnavailableError(KVTierError):
    """A tier cannot be used (missing root, read-only folder, dead server)."""


class NoSpaceError(KVTierError):
    """A tier has no room for a chunk and nothing can be evicted."""
