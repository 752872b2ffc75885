"""EventSubscriber: reads one publisher's KV events (kvtier's or a vLLM instance's) into a KVIndex.

    sub = EventSubscriber(index, "engine-0", "tcp://127.0.0.1:5557", replay="tcp://127.0.0.1:5558")
    sub.poll(timeout_ms)     read what has arrived (the caller's thread; no thread of its own)
    sub.close()

Sequence numbers: a batch's number is (incarnation, n) (kvtier.events.wire.split_seq): kvtier's
publisher draws a random incarnation per process; vLLM's is always 0. `last_seq` is the n of the
last batch applied. A batch numbered past the last one applied plus one means batches were lost
(the PUB socket's high-water mark, a subscriber that joined late). The subscriber then asks the
replay socket for everything from the first missing number, applies it in order, and goes on.
If the replay cannot fill the gap (no replay socket, it timed out, the publisher's buffer no
longer reaches back that far, or it skips numbers), the source's view is cleared (better no
hint than a wrong one) and the loss counted in `stats`. Duplicates (a replayed batch arriving
again live) are skipped.

Restarts (`stats.restarts`): the source's view is cleared and the new process followed from its
batch 0 (replayed when its first batches were lost). A batch of another incarnation is a new
process, whatever its number: one whose first batches never arrived (ZMQ's slow joiner) may
number its next one just past the dead process's last. Without an incarnation (vLLM's numbers),
a live batch numbered at or below the last one applied but stamped later than every batch
applied is taken for a restart; a restart that lost its first batches cannot be seen there.
A message that does not decode is dropped and counted, never raised.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import msgspec
import zmq

from kvtier.events.wire import BatchCodec, KVEventBatch, join_seq, split_seq
from kvtier.router.index import KVIndex

_log = logging.getLogger(__name__)
END_SEQ = -1


@dataclass(slots=True)
class SubscriberStats:
    applied: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    gaps: int = 0
    replayed: int = 0
    unrecovered_gaps: int = 0
    replay_timeouts: int = 0
    restarts: int = 0
    stale: int = 0  # live batches of a dead process, dropped after the replay showed its successor


class EventSubscriber:
    def __init__(self, index: KVIndex, instance: str, endpoint: str, replay: str | None = None,
                 topic: str = "", encoding: str = "map", source: str | None = None,
                 replay_timeout_ms: int = 2000, context: zmq.Context | None = None) -> None:
        self.index = index
        self.instance = instance
        self.source = source or endpoint
        self.endpoint = endpoint
        self.replay_endpoint = replay
        self.replay_timeout_ms = replay_timeout_ms
        self.stats = SubscriberStats()
        self.last_seq: int | None = None  # the last batch applied, numbered within its incarnation
        self.incarnation: int | None = None  # of the publisher followed (0: vLLM's numbers, no identity)
        self.last_ts: float | None = None  # the latest stamp of a batch applied (a restart's are later)
        self._codec = BatchCodec(encoding)
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        self._sub.connect(endpoint)
        self._replay: zmq.Socket | None = None

    def poll(self, timeout_ms: int = 0) -> int:
        """Apply every message waiting (waiting up to `timeout_ms` for the first); how many batches."""
        n = 0
        while self._sub.poll(timeout_ms if n == 0 else 0):
            frames = self._sub.recv_multipart()
            n += 1
            self._receive(frames, live=True)
        return n

    def _receive(self, frames: list[bytes], live: bool) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.bad_messages += 1
            return
        number = int.from_bytes(frames[1], "big", signed=True)
        if number < 0:
            self.stats.bad_messages += 1
            return
        incarnation, seq = split_seq(number)
        if incarnation != self.incarnation:
            if self.incarnation is not None:
                self._restarted(f"batch {seq} of incarnation {incarnation:#x}, after {self.incarnation:#x}")
            self.incarnation = incarnation
        batch: KVEventBatch | None = None
        if self.last_seq is not None and seq <= self.last_seq:
            # with an incarnation on the wire that is a duplicate; without one, a batch stamped after
            # every batch applied is a new process numbering from 0 again
            batch = self._decode(seq, frames[2]) if live and incarnation == 0 else None
            if batch is None or self.last_ts is None or not batch.ts > self.last_ts:
                self.stats.duplicates += 1
                return
            self._restarted(f"batch {seq} after {self.last_seq}, stamped later")
        expected = 0 if self.last_seq is None else self.last_seq + 1
        if not live and seq > expected:  # a replay that skips numbers (the replay socket dropped replies)
            self._lost(expected, f"the replay skipped to batch {seq}")
        if live and seq > expected:
            self.stats.gaps += 1
            lost_before = self.stats.unrecovered_gaps
            self._resync(expected)
            if self.incarnation != incarnation:  # the replay came from a process started since this batch's
                self.stats.stale += 1
                return
            if self.last_seq is not None and seq <= self.last_seq:
                self.stats.duplicates += 1
                return
            reached = -1 if self.last_seq is None else self.last_seq
            if reached + 1 < seq and self.stats.unrecovered_gaps == lost_before:
                self._lost(reached + 1, f"the replay ended before batch {seq}")
        if batch is None:
            batch = self._decode(seq, frames[2])
            if batch is None:
                self.last_seq = seq
                return
        self._apply(seq, batch)

    def _restarted(self, why: str) -> None:
        self.stats.restarts += 1
        _log.warning("kv events from %s: %s: the publisher restarted; forgetting its view and following it "
                     "from its first batch", self.source, why)
        self.index.clear(self.instance, self.source)
        self.last_seq = None

    def _decode(self, seq: int, payload: bytes) -> KVEventBatch | None:
        try:
            batch = self._codec.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.stats.bad_messages += 1
            _log.warning("kv events from %s: batch %d does not decode (%s); dropped", self.source, seq, e)
            return None
        if not math.isfinite(batch.ts):  # an infinite stamp would make every later batch look older
            self.stats.bad_messages += 1
            _log.warning("kv events from %s: batch %d is stamped %r; dropped", self.source, seq, batch.ts)
            return None
        return batch

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        self.index.apply(self.instance, self.source, batch)
        self.last_seq = seq
        self.last_ts = batch.ts if self.last_ts is None else max(self.last_ts, batch.ts)
        self.stats.applied += 1

    def _resync(self, start: int) -> None:
        """Fetch batches start.. from the replay socket; clear the view if they cannot all come."""
        if self.replay_endpoint is None:
            self._lost(start, "no replay socket")
            return
        sock = self._replay_socket()
        sock.send_multipart((b"", join_seq(self.incarnation or 0, start).to_bytes(8, "big")))
        first = True
        while True:
            if not sock.poll(self.replay_timeout_ms):
                self.stats.replay_timeouts += 1
                self._drop_replay_socket()
                self._lost(start, "the replay socket did not answer")
                return
            frames = sock.recv_multipart()
            if len(frames) == 4 and frames[0] == b"":
                frames = frames[1:]
            if len(frames) != 3 or len(frames[1]) != 8:
                self.stats.bad_messages += 1
                continue
            number = int.from_bytes(frames[1], "big", signed=True)
            if number == END_SEQ:
                return
            incarnation, seq = split_seq(number)
            # (a batch of another incarnation is a restart: _receive follows the new process from it)
            if first and number >= 0 and incarnation == self.incarnation and seq > start:
                self._lost(start, f"the replay buffer starts at {seq}")
                self.last_seq = seq - 1  # followed from there (the view is cleared)
            first = False
            self.stats.replayed += 1
            self._receive(frames, live=False)

    def _lost(self, start: int, why: str) -> None:
        self.stats.unrecovered_gaps += 1
        _log.warning("kv events from %s: batches from %d are lost (%s); forgetting its view", self.source, start, why)
        self.index.clear(self.instance, self.source)

    def _replay_socket(self) -> zmq.Socket:
        if self._replay is None:
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            assert self.replay_endpoint is not None
            self._replay.connect(self.replay_endpoint)
        return self._replay

    def _drop_replay_socket(self) -> None:
        if self._replay is not None:
            self._replay.close(linger=0)
            self._replay = None

    def resync(self) -> None:
        """Ask the replay socket for everything after the last batch applied (e.g. at start)."""
        self._resync(0 if self.last_seq is None else self.last_seq + 1)

    def close(self) -> None:
        self._sub.close(linger=0)
        self._drop_replay_socket()
