"""Publishes what kvtier's tiers gain and lose as vLLM-format KV events over ZMQ.

    pub = KVEventPublisher(EventsConfig("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"))
    pub.attach_store(store)        # or attach(tier) per tier; called by whoever owns the store
    ...
    pub.flush(timeout_s)           # wait until everything recorded so far is on the wire
    pub.close()

Wire protocol (vLLM's ZmqEventPublisher): the PUB socket sends three frames per batch, the
topic, an 8-byte big-endian sequence number and the msgpack batch. The numbers count up by one
per batch from `join_seq(incarnation, 0)`: a random incarnation per publisher in the high bits
tells subscribers a restarted process from the dead one (kvtier.events.wire; `incarnation=0`
numbers from 0, as vLLM does). The ROUTER replay socket takes `[b"", start_seq (8 bytes,
big-endian)]` from a DEALER (or REQ) and answers every buffered batch with seq >= start_seq as
`[b"", topic, seq, payload]`, then an end marker `[b"", b"", -1 (8 bytes, signed), b""]`.

Attaching a tier: its observer goes in first, then its chunks are listed; changes heard before
the listing is announced wait for it, and each tier's chunks are kept as a set, so a chunk stored
(or dropped) while the tier is being listed is counted once whichever way it is heard: every
chunk stored is announced once and its removal is announced.

Threads: tiers call the observer (`_TierFeed.on_change`) on their own threads, after releasing
their locks; it only converts the change and puts it on a queue (never blocks: a full queue
drops the event and counts it). One publisher thread owns both sockets: it answers replay
requests and sends batches. Sockets are bound in the constructor, so a taken port fails there.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import zmq

from kvtier.core.codec import SECTION_BLOCK_HASHES, decode_block_hashes
from kvtier.core.errors import CorruptChunkError, KVTierError
from kvtier.events.config import EventsConfig
from kvtier.events.wire import (
    INCARNATION_BITS,
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BatchCodec,
    BlockRemoved,
    BlockStored,
    KVEvent,
    block_hash_of,
    join_seq,
    new_incarnation,
)
from kvtier.tiers.base import Tier, TierChange, TierObserver

_log = logging.getLogger(__name__)
BlockHash = int | bytes
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_STOP = object()


class EventsBindError(KVTierError):
    """An events socket could not be bound (the port is taken, the ipc folder is missing)."""


def medium_of(tier: Tier) -> str:
    """The vLLM medium a tier's chunks are published under: CPU for DRAM, STORAGE for the rest."""
    return MEDIUM_CPU if tier.name == "memory" else MEDIUM_STORAGE


class _Listed(NamedTuple):
    """A chunk a tier held when attach() listed it, and its block hashes section (None: none, unread
    or unreadable; `read` says whether it was read)."""

    key: bytes
    section: bytes | None
    read: bool


class _TierFeed:
    """One attached tier: its observer, the chunks of it announced so far, and the changes heard
    while attach() was still reading its listing.

    The tier's listing and its observer cannot be taken in one step from here (the observer hears
    changes after the tier's lock is released), so a chunk stored between the observer going in
    and the listing is both listed and heard, and one dropped meanwhile may be heard before the
    listing is announced. Each chunk is therefore counted as a member of a set: the listing is
    applied first, then the changes heard since the observer went in, in the tier's order; a store
    of a chunk already held, or a removal of one not held, changes nothing. That ends on what the
    tier holds, and announces each chunk's arrival and departure once."""

    def __init__(self, pub: KVEventPublisher, tier: Tier, medium: str) -> None:
        self.pub = pub
        self.tier = tier
        self.medium = medium
        self.block_size = tier.chunk_tokens
        self._lock = threading.Lock()  # one change at a time, in the order the tier delivers them
        self._held: set[bytes] = set()
        self._hashes: dict[bytes, list[BlockHash]] = {}  # key -> the engine hashes published for it
        self._waiting: list[TierChange] | None = []  # heard before the listing was announced

    def on_change(self, change: TierChange) -> None:
        with self._lock:
            if self._waiting is not None:
                self._waiting.append(change)
            else:
                self._apply(change)

    def announce_listing(self, listed: list[_Listed]) -> None:
        """Announce the chunks the tier held when listed, then what was heard since the observer went in.

        Never calls into the tier under the feed's lock (a read that drops a corrupt chunk tells the
        observer at once, on this thread): a chunk listed unread that no other tier holds any more
        is read between two holds of the lock, while changes heard keep waiting."""
        with self._lock:
            ready, unread = [], []
            for item in listed:
                if item.key in self._held:
                    continue
                self._held.add(item.key)
                if not self.pub._first_or_last(self.medium, item.key, True):
                    continue  # another tier of this medium announced it
                if item.read:
                    ready.append(item)
                else:
                    unread.append(item.key)  # counted: no other tier announces it meanwhile
            self._announce_stored(ready)
        if unread:
            read = [_Listed(key, _read_block_hashes(self.tier, key), True) for key in unread]
            with self._lock:
                self._announce_stored(read)
        with self._lock:
            waiting, self._waiting = self._waiting or [], None
            for change in waiting:
                self._apply(change)

    def _announce_stored(self, listed: list[_Listed]) -> None:
        """BlockStored for listed chunks: under their block hashes, or all the plain ones in one event."""
        plain: list[int | bytes] = []
        for item in listed:
            if item.section is None:
                plain.append(block_hash_of(item.key))
                continue
            for event in self.pub._stored_events(item.key, item.section, None, self.medium, self.block_size,
                                                 self._hashes):
                self.pub._put(event)
        if plain:
            self.pub._put(BlockStored(plain, None, [], self.block_size, None, self.medium, None))

    def _apply(self, change: TierChange) -> None:
        stored = change.kind == "stored"
        if (change.key in self._held) == stored:
            return  # stored again while held, or dropped while not held: counted already
        if stored:
            self._held.add(change.key)
        else:
            self._held.discard(change.key)
        events = self.pub._events_of(change, self.medium, self.block_size, self._hashes)
        if self.pub._first_or_last(self.medium, change.key, stored):
            for event in events:
                self.pub._put(event)


def _read_block_hashes(tier: Tier, key: bytes) -> bytes | None:
    try:
        return tier.read_section(key, SECTION_BLOCK_HASHES, 0)
    except Exception:  # a chunk unreadable now is published under its key; a load will drop it
        return None


class KVEventPublisher:
    def __init__(self, config: EventsConfig, context: zmq.Context | None = None,
                 incarnation: int | None = None) -> None:
        """`incarnation`: the high bits of this publisher's sequence numbers (None: a random one;
        0: numbered from 0 as vLLM does, so that a restart cannot be told from the wire)."""
        if incarnation is None:
            incarnation = new_incarnation()
        if isinstance(incarnation, bool) or not isinstance(incarnation, int) \
                or not 0 <= incarnation < 1 << INCARNATION_BITS:
            raise ValueError(f"incarnation must be an int in 0..{(1 << INCARNATION_BITS) - 1}, got {incarnation!r}")
        self.incarnation = incarnation
        self.config = config
        self._codec = BatchCodec(config.encoding)
        self._topic = config.topic.encode("utf-8")
        self._ctx = context or zmq.Context.instance()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._attached: list[tuple[Tier, TierObserver]] = []
        self._cond = threading.Condition()
        self._enqueued = 0
        self._sent = 0
        # where events were dropped (queue full): after how many enqueued events each loss sits. The
        # batch before a loss ends there, and the next skips a number (subscribers see a gap there)
        self._drops: collections.deque[int] = collections.deque()
        self._holders: dict[tuple[str, bytes], int] = {}  # (medium, chunk key) -> attached tiers holding it
        self.stats = {"batches": 0, "events": 0, "dropped_queue_full": 0, "replay_requests": 0,
                      "replay_bad_requests": 0, "send_errors": 0, "bad_block_hashes": 0}
        self._pub = self._bind(zmq.PUB, config.endpoint, "endpoint")
        self._replay = None
        if config.replay_endpoint is not None:
            try:
                self._replay = self._bind(zmq.ROUTER, config.replay_endpoint, "replay_endpoint")
            except BaseException:
                self._pub.close(linger=0)
                raise
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvtier-events", daemon=True)
        self._thread.start()

    def _bind(self, kind: int, endpoint: str, name: str) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.PUB:
            sock.set_hwm(self.config.hwm)
        else:  # a ROUTER drops replies past its high-water mark, silently: room for a whole replay
            sock.setsockopt(zmq.SNDHWM, self.config.buffer_steps + 16)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise EventsBindError(f"events.{name} {endpoint}: cannot bind ({e.strerror})") from e
        return sock

    @property
    def endpoint(self) -> str:
        """The PUB socket's bound address (tcp://127.0.0.1:0 resolves to the port it got)."""
        return self._pub.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def replay_endpoint(self) -> str | None:
        return None if self._replay is None else self._replay.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- what the tiers tell us -------------------------------------------------------------
    def attach(self, tier: Tier, medium: str | None = None) -> None:
        """Publish `tier`'s changes from now on, after a BlockStored for each chunk it holds now."""
        medium = medium or medium_of(tier)
        feed = _TierFeed(self, tier, medium)
        observer = feed.on_change  # one bound method: remove_observer finds it by identity
        tier.add_observer(observer)  # first: whatever changes after the listing is heard
        self._attached.append((tier, observer))
        listed: list[_Listed] = []
        keys = getattr(tier, "keys", None)
        if keys is not None:
            for key in keys():
                if self._held_elsewhere(medium, key):  # announced by another tier: read only if that changes
                    listed.append(_Listed(key, None, False))
                else:
                    listed.append(_Listed(key, _read_block_hashes(tier, key), True))
        feed.announce_listing(listed)

    def _held_elsewhere(self, medium: str, key: bytes) -> bool:
        with self._cond:
            return (medium, key) in self._holders

    def _first_or_last(self, medium: str, key: bytes, stored: bool) -> bool:
        """Count the tiers of `medium` holding `key`: whether this change is the first tier to
        store it or the last to drop it, the only ones its subscribers hear of. The disk tier and
        the lower tiers all publish as STORAGE, and the index keeps one set per medium: a disk
        eviction would otherwise erase a chunk Redis still holds."""
        slot = (medium, key)
        with self._cond:
            held = self._holders.get(slot, 0)
            if stored:
                self._holders[slot] = held + 1
                return held == 0
            if held <= 1:
                self._holders.pop(slot, None)
                return True
            self._holders[slot] = held - 1
            return False

    def attach_store(self, store: Any) -> None:
        """Attach every tier of a TieredStore (DRAM, disk, the lower tiers)."""
        for tier in list(store.tiers) + list(getattr(store, "lower_tiers", [])):
            self.attach(tier)

    def publish_cleared(self) -> None:
        """AllBlocksCleared: subscribers drop everything they know of this publisher."""
        self._put(AllBlocksCleared())

    def _events_of(self, change: TierChange, medium: str, block_size: int,
                   held_hashes: dict[bytes, list[BlockHash]]) -> list[KVEvent]:
        """A tier change as events. A chunk stored with SECTION_BLOCK_HASHES (saved through the
        vLLM connector) is published under the engine's block hashes, one BlockStored per block
        (a chunk of several blocks fans out), and its removal as one BlockRemoved per block;
        any other chunk under `block_hash_of(key)`."""
        if change.kind == "stored":
            meta = change.meta
            section = None
            if meta is not None:
                section = next((data for kind, index, data in meta.extras
                                if kind == SECTION_BLOCK_HASHES and index == 0), None)
            parent_key = meta.parent if meta is not None and meta.depth > 0 else None
            return self._stored_events(change.key, section, parent_key, medium, block_size, held_hashes)
        hashes = held_hashes.pop(change.key, None)
        if hashes is None:
            return [BlockRemoved([block_hash_of(change.key)], medium)]
        return [BlockRemoved([h], medium) for h in hashes]

    def _stored_events(self, key: bytes, section: bytes | None, parent_key: bytes | None, medium: str,
                       block_size: int, held_hashes: dict[bytes, list[BlockHash]]) -> list[KVEvent]:
        if section is not None:
            try:
                parent, hashes = decode_block_hashes(section)
                if block_size % len(hashes):
                    raise CorruptChunkError(f"{len(hashes)} block hashes for a chunk of {block_size} tokens")
            except CorruptChunkError as e:
                self.stats["bad_block_hashes"] += 1
                _log.warning("kv events: chunk %s: its block hashes section is unusable (%s); "
                             "published under its key", key.hex()[:16], e)
            else:
                held_hashes[key] = hashes
                per_block = block_size // len(hashes)
                events: list[KVEvent] = []
                for h in hashes:
                    events.append(BlockStored([h], parent, [], per_block, None, medium, None))
                    parent = h
                return events
        parent_hash = block_hash_of(parent_key) if parent_key is not None else None
        return [BlockStored([block_hash_of(key)], parent_hash, [], block_size, None, medium, None)]

    def _put(self, event: KVEvent) -> None:
        if self._closed:
            return
        with self._cond:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.stats["dropped_queue_full"] += 1
                if not self._drops or self._drops[-1] != self._enqueued:
                    self._drops.append(self._enqueued)
                return
            self._enqueued += 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event put so far is sent; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._enqueued
            while self._sent < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    # -- the publisher thread -----------------------------------------------------------------
    def _run(self) -> None:
        seq = join_seq(self.incarnation, 0)  # the numbers of this process's batches count up from here
        taken = 0  # events taken off the queue so far (as _enqueued counts them)
        max_events = self.config.batch_max_events
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._serve_replay()
            try:
                first = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            if first is _STOP:
                break
            with self._cond:
                # a loss before this batch's first event: a number no batch gets, so no replay can fill
                # it, and every subscriber's view of this source is cleared (never left holding what
                # the lost events changed). Events from before the loss went in the batches before it.
                while self._drops and self._drops[0] <= taken:
                    self._drops.popleft()
                    seq += 1
                end = self._drops[0] if self._drops else None  # this batch ends at the next loss
            events = [first]
            taken += 1
            stop = False
            while len(events) < max_events and taken != end:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                events.append(item)
                taken += 1
            self._send(seq, events)
            seq += 1
            with self._cond:
                self._sent += len(events)
                self._cond.notify_all()
                announce = bool(self._drops) and self._drops[0] == taken
                if announce:
                    self._drops.popleft()
            if announce:  # a loss right after this batch: an empty batch past the skipped number shows
                seq += 1  # the gap now, not only when a later event comes (its view is cleared at once)
                self._send(seq, [])
                seq += 1
            if stop:
                break
        with self._cond:
            self._cond.notify_all()

    def _send(self, seq: int, events: list[KVEvent]) -> None:
        payload = self._codec.encode(time.time(), events, self.config.data_parallel_rank)
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        except zmq.ZMQError:
            self.stats["send_errors"] += 1
            _log.exception("kv events: sending batch %d failed (it stays replayable)", seq)
        self._buffer.append((seq, payload))
        self.stats["batches"] += 1
        self.stats["events"] += len(events)

    def _serve_replay(self) -> None:
        """Answer one replay request; a malformed one is counted and answered with the end marker."""
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        self.stats["replay_requests"] += 1
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            self.stats["replay_bad_requests"] += 1
            _log.warning("kv events: malformed replay request (%d frames) dropped", len(frames))
            if len(frames) >= 2 and frames[1] == b"":
                self._send_replay(frames[0], (b"", END_SEQ, b""))
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= start_seq:
                self._send_replay(client, (self._topic, seq.to_bytes(8, "big"), payload))
        self._send_replay(client, (b"", END_SEQ, b""))

    def _send_replay(self, client: bytes, frames: Iterable[bytes]) -> None:
        assert self._replay is not None
        try:
            self._replay.send_multipart((client, b"", *frames), flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the client went away or is not reading: its loss, not ours
            self.stats["send_errors"] += 1

    def close(self) -> None:
        """Detach from the tiers, send what is queued, stop the thread, close the sockets."""
        if self._closed:
            return
        for tier, observer in self._attached:
            tier.remove_observer(observer)
        self._attached.clear()
        self._queue.put(_STOP)
        self._closed = True
        self._thread.join(timeout=5.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
