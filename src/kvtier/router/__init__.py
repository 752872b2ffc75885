"""kvtier.router: a cache-aware router fed by KV events (kvtier's and vLLM's).

index.py       KVIndex: per instance and source, which block hashes sit on which medium; scoring
subscriber.py  EventSubscriber: a ZMQ SUB socket into a KVIndex, with replay after a gap
route.py       CacheAwareRouter: the best-scoring instance within a cap on its load
"""

from kvtier.router.index import DEFAULT_WEIGHTS, KVIndex
from kvtier.router.route import CacheAwareRouter
from kvtier.router.subscriber import EventSubscriber

__all__ = ["DEFAULT_WEIGHTS", "CacheAwareRouter", "EventSubscriber", "KVIndex"]
