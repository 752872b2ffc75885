"""kvtier.store: the TieredStore (lookup, load, save, promote, evict) and its transfer handles."""

from kvtier.store.tiered import LoadResult, LookupResult, SaveBatch, SaveResult, TieredStore
from kvtier.store.transfer import TransferHandle

__all__ = ["LoadResult", "LookupResult", "SaveBatch", "SaveResult", "TieredStore", "TransferHandle"]
