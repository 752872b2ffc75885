"""kvtier.client: the one store API engines use (`connect(config) -> StoreClient`).

InProcessClient wraps a TieredStore in this process; ServiceClient talks to the host's
`kvtier serve`. See api.py for the contract.
"""

from kvtier.client.api import InProcessClient, LookupReply, SaveSession, StoreClient, connect
from kvtier.service.protocol import FlushTimeoutError, LeaseError, ServiceError
from kvtier.store.tiered import LoadResult, SaveResult


def __getattr__(name: str) -> object:
    if name == "ServiceClient":  # imported lazily: in-process users need no socket code
        from kvtier.client.service_client import ServiceClient

        return ServiceClient
    raise AttributeError(name)


__all__ = ["FlushTimeoutError", "InProcessClient", "LeaseError", "LoadResult", "LookupReply", "SaveResult",
           "SaveSession", "ServiceClient", "ServiceError", "StoreClient", "connect"]
