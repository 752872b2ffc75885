"""KV events: what kvtier's tiers gain and lose, published in vLLM's format for cache-aware routers.

wire.py       the msgspec structs and batch codec (vLLM 0.32's map encoding, or the older array one)
config.py     EventsConfig
publisher.py  KVEventPublisher: a tier observer, a ZMQ PUB socket and a ROUTER replay socket
"""

from kvtier.events.config import EventsConfig
from kvtier.events.publisher import EventsBindError, KVEventPublisher, medium_of
from kvtier.events.wire import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BatchCodec,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    block_hash_of,
)

__all__ = ["MEDIUM_CPU", "MEDIUM_STORAGE", "AllBlocksCleared", "BatchCodec", "BlockRemoved", "BlockStored",
           "EventsBindError", "EventsConfig", "KVEventBatch", "KVEventPublisher", "block_hash_of", "medium_of"]
