"""Eviction policies: small strategy objects in a registry, shared by every tier and by the
trace simulator (kvtier.bench.trace).

A policy sees each chunk's parent and depth. In a prefix cache a chunk is useless without
its parent (lookup stops at the first miss), so evicting a parent strands its children:
every policy here evicts only chunks with no cached child ("leaves") while one exists,
which means the head of a chain is never evicted before its tail.

Protocol (called by a tier under the tier's lock):
    admit(key, parent, depth) -> bool   may this new chunk be cached at all?
    insert(key, parent, depth)          a chunk became resident
    touch(keys)                         a hit on a chain's leading chunks, in chain order;
                                        policies apply it tail-first (the head ends freshest)
    remove(key)                         a chunk left for another reason (delete, corruption)
    evict(can_evict) -> key | None      choose, forget and return a victim; `can_evict`
                                        says whether a key may go (a pinned chunk may not)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from kvtier.core.errors import ConfigError

Key = bytes


class EvictionPolicy(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, int] = {}

    # -- structure bookkeeping shared by all policies ------------------------------
    def _link(self, key: Key, parent: Key | None) -> None:
        self._parent[key] = parent
        self._children.setdefault(key, 0)
        if parent is not None and parent in self._children:
            self._children[parent] += 1

    def _unlink(self, key: Key) -> None:
        parent = self._parent.pop(key, None)
        self._children.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent] -= 1

    def is_leaf(self, key: Key) -> bool:
        return self._children.get(key, 0) == 0

    def __contains__(self, key: object) -> bool:
        return key in self._parent

    def __len__(self) -> int:
        return len(self._parent)

    # -- the protocol --------------------------------------------------------------
    def begin_request(self, now: float) -> None:
        """A request starts at `now` (seconds, any fixed origin); optional, default no-op."""
        return None

    def admit(self, key: Key, parent: Key | None, depth: int) -> bool:
        return True

    @abstractmethod
    def insert(self, key: Key, parent: Key | None, depth: int) -> None: ...

    @abstractmethod
    def touch(self, keys: Sequence[Key]) -> None: ...

    @abstractmethod
    def remove(self, key: Key) -> None: ...

    @abstractmethod
    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None: ...


def _pick_from_order(order: "OrderedDict[Key, None]", policy: EvictionPolicy,
                     can_evict: Callable[[Key], bool]) -> Key | None:
    """Oldest evictable leaf in `order`, else the oldest evictable chunk at all."""
    fallback = None
    for key in order:
        if can_evict(key):
            if policy.is_leaf(key):
                return key
            if fallback is None:
                fallback = key
    return fallback


class LRUPolicy(EvictionPolicy):
    """Least recently used, among leaves first; hits touch tail-first."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, parent: Key | None, depth: int) -> None:
        if key in self._order:
            self._order.move_to_end(key)
            return
        self._link(key, parent)
        self._order[key] = None

    def touch(self, keys: Sequence[Key]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                order.move_to_end(key)

    def remove(self, key: Key) -> None:
        if self._order.pop(key, 0) is None:
            self._unlink(key)

    def evict(self, can_evict: Callable[[Key], bool]) -> Key | None:
        victim = _pick_from_order(self._order, self, can_evict)
        if victim is not None:
            self.remove(victim)
        return victim


class FIFOPolicy(LRUPolicy):
    """First in, first out (UCM's DRAM tier); hits do not reorder."""

    name = "fifo"

    def touch(self, keys: Sequence[Key]) -> None:
        return None


POLICIES: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    POLICIES[cls.name] = cls
    return cls


for _cls in (LRUPolicy, FIFOPolicy):
    register_policy(_cls)


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"eviction policy {name!r} is unknown; choose one of {sorted(POLICIES)}") from None
