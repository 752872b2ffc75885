"""Owner-managed capacity for the Redis tier (RedisTierConfig.capacity_bytes > 0).

Who calls: RedisTier, which builds one AccessLog per tier in owner-managed mode: `record_hits`
from its touch() (the store's lookup threads), `record_save` from its write() (the store's
lower-tier writer thread), and `step()` from the tier's own background thread every `flush_s`.

Why: a server's allkeys-lru samples keys and knows nothing of chains, so it evicts parents under
live children; kvtier's prefix-aware policies keep more of the fleet's prefixes (kvtier bench
fleet, Mooncake trace, 4 hosts: 1.06x of one host with their DRAM for the owner-managed model,
0.87x for the server's sampled LRU, 0.89x for exact LRU). They need every host's accesses in one
order, which is what a Redis Stream is:

- Every host appends its accesses to the stream `{<namespace>:<layout>}.accesses` (XADD with an
  approximate MAXLEN of `stream_maxlen`): a save (key, parent, depth, value bytes) once its
  SET NX stored the chunk, and the hits of each lookup (the leading keys of one chain, in chain
  order: the owner's policy applies them tail first, so the head ends freshest, as the shared
  folder's mtime replay does). Records are buffered and sent with the next chunk write's
  pipeline or by the tier's background thread, never in a lookup's or a load's round trip.
- An owner (a host that sets `owner`; of several, the one holding the owner lease, a key beside
  the stream taken with SET NX PX `owner_lease_s` and renewed at its steps, the others standing by
  until it lapses or is released at close) replays the stream from its last id (INFO server, then
  XREAD in MULTI with XINFO STREAM and a GET of the epoch key) into `make_policy(policy)`,
  accounts each chunk's value bytes, and DELs the policy's victims (leaves before their parents)
  while the accounted bytes exceed `capacity_bytes`. Only the owner deletes (besides any host's
  deletion of a value that fails verification).
- On start (and on taking the lease over), the owner SCANs the namespace's chunk keys on every
  primary, reads each one's size (STRLEN) and header (GETRANGE: its parent and depth, verified),
  orders them as the records the stream still holds say (chunks with no save record left first,
  parents first, then the retained records replayed), trims, and follows the stream from the
  point of the scan. In a cluster, a key whose slot is moving (MOVED, ASK) is asked at the node
  the answer names; one that still does not answer is asked again at each step until accounted.
  A reconciling rescan runs every `rescan_s` (keys it did not know are adopted, keys gone are
  forgotten, the policy's order kept), and a fresh one (a resync, counted) whenever the view or
  the owner's stream position no longer holds, as each replay and each reconcile first checks:
  the stream was trimmed past its last id (it fell `stream_maxlen` records behind: XINFO STREAM's
  entries-added minus length exceeds the records it has read; XTRIM does not move
  max-deleted-entry-id); the server lost its data (the epoch key, which the owner sets with SET
  NX beside the stream, is gone: a reconcile that set a new one does not take it as its own);
  the stream's server restarted or changed (INFO server's run_id: restarted from an older
  snapshot, its keys are not the view's; a failover); or the stream went back (gone, its last id
  behind the owner's position, fewer records added than the owner read: a new stream's ids may
  be below the old last id, and reading on from there would skip its records).

Operations: run the server with `maxmemory` above capacity_bytes plus the stream (measured on
Redis 7.0: ~100 bytes a save record, ~10 + 8 per key a hit record) and key overheads,
`maxmemory-policy allkeys-lru`, as a backstop. If no owner runs, nothing is evicted by kvtier: the chunks grow to the server's maxmemory and its LRU evicts, as in
server-managed mode, and the non-owners' records wait in the stream (those trimmed meanwhile are
recovered by the resync when the owner returns). A dead server costs this mode nothing on the hot
path: records wait in a bounded buffer (the oldest dropped and counted) behind the tier's circuit
breaker. In a cluster, a restarted node other than the stream's loses its chunks without the owner
noticing until its next rescan (their DELs then find nothing); it only evicts early meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from redis.exceptions import AskError, MovedError, RedisError, ResponseError, TryAgainError

from kvtier.core import metrics as m
from kvtier.core.errors import CorruptChunkError
from kvtier.tiers.policies import EvictionPolicy, make_policy

if TYPE_CHECKING:
    from kvtier.tiers.redis import RedisTier, _Route

log = logging.getLogger(__name__)

MAX_BUFFERED = 20_000  # access records a host holds while the server cannot take them
READ_COUNT = 4096  # stream records the owner reads per XREAD
MAX_RUNS_PER_ENTRY = 512  # hit records one stream entry may carry
HIT_KEY_BYTES = 8  # bytes of each key a hit record carries (a 32-byte key: a quarter of the stream)
SCAN_COUNT = 1000  # keys per SCAN step (and per pipeline of STRLEN/GETRANGE)
MAX_ADOPTED = 1 << 20  # adopted chunks whose save record has not arrived, at most (then forgotten)
MAX_REDIRECTS = 3  # MOVED/ASK answers a rescan follows per key (then the key is asked again at the next step)
# renew the owner lease only while it is still this owner's (a plain PEXPIRE could extend another's)
_RENEW_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
StreamId = tuple[int, int]


@dataclass(slots=True, frozen=True)
class Save:
    """A chunk a host stored (its SET NX created the key)."""

    key: bytes
    parent: bytes | None
    depth: int
    size: int


@dataclass(slots=True, frozen=True)
class Hits:
    """A lookup's hits in this tier: keys of one chain, in chain order, each as its first
    HIT_KEY_BYTES bytes (a chunk key is a cryptographic digest: the owner maps the prefix back to
    the key it accounts; a rare collision only moves one touch to the other chunk)."""

    keys: tuple[bytes, ...]


@dataclass(slots=True)
class OwnerReport:
    """What the owner has done since it started (a non-owner's stays at zeros but `dropped`)."""

    synced: bool = False  # the owner's view is built (it evicts only then)
    used_bytes: int = 0
    chunks: int = 0
    applied: int = 0  # stream records replayed
    evicted: int = 0  # chunks the owner deleted for room
    rescans: int = 0  # full scans of the keys (start, periodic, resync)
    resyncs: int = 0  # rescans forced by lost records (stream trimmed past the owner, server data lost or restarted)
    vanished: int = 0  # chunks the owner accounted but found gone (rescans, DELs that found nothing)
    corrupt: int = 0  # values a rescan found corrupt (deleted)
    dropped: int = 0  # access records this host dropped: its buffer was full while the server was away
    leader: bool = False  # this owner holds the owner lease (the others stand by)
    lease_lost: int = 0  # times another owner took the lease from this one (it had stopped renewing)
    last_error: str = ""  # the background thread's last failure, if any


def encode_record(record: Save | Hits) -> list[bytes]:
    """A record's stream entry fields (flat name, value pairs; binary keys as they are)."""
    if isinstance(record, Save):
        return [b"op", b"s", b"k", record.key, b"p", record.parent or b"", b"d", b"%d" % record.depth,
                b"n", b"%d" % record.size]
    width = len(record.keys[0]) if record.keys else 0
    if any(len(k) != width for k in record.keys):
        raise ValueError("keys of one hit record must have one length")
    return [b"op", b"h", b"w", b"%d" % width, b"k", b"".join(record.keys)]


def decode_entry(fields: Sequence[Any]) -> list[Save | Hits]:
    """The records of a stream entry's fields (several hit records may share one entry: their key
    counts in `r`); none for an entry kvtier did not write."""
    try:
        f = {bytes(fields[i]): bytes(fields[i + 1]) for i in range(0, len(fields) - 1, 2)}
        op = f.get(b"op")
        if op == b"s":
            return [Save(f[b"k"], f[b"p"] or None, int(f[b"d"]), int(f[b"n"]))]
        if op == b"h":
            width, blob = int(f[b"w"]), f[b"k"]
            if width <= 0 or len(blob) % width:
                return []
            keys = [blob[i:i + width] for i in range(0, len(blob), width)]
            runs = [int(n) for n in f[b"r"].split(b",")] if b"r" in f else [len(keys)]
            if sum(runs) != len(keys) or min(runs) <= 0:
                return []
            out: list[Save | Hits] = []
            for n in runs:
                out.append(Hits(tuple(keys[:n])))
                keys = keys[n:]
            return out
    except (KeyError, ValueError, TypeError, IndexError):
        return []
    return []


def coalesce(entries: Sequence[list[bytes]], max_runs: int = MAX_RUNS_PER_ENTRY) -> list[list[bytes]]:
    """Entries (encode_record's) with each run of consecutive hit records of one key width merged
    into one entry of up to `max_runs` records: one XADD for a flush's hits, order kept."""
    out: list[list[bytes]] = []
    runs: list[int] = []  # key counts of the hit entry being built (out[-1]), if one is
    for fields in entries:
        if fields[1] == b"h" and runs and out[-1][3] == fields[3] and len(runs) < max_runs:
            width = int(fields[3])
            out[-1][5] += fields[5]
            runs.append(len(fields[5]) // width)
            out[-1][7] = b",".join(b"%d" % n for n in runs)
            continue
        if fields[1] == b"h" and b"r" not in fields:
            out.append([*fields[:6], b"r", b"%d" % (len(fields[5]) // int(fields[3]))])
            runs = [len(fields[5]) // int(fields[3])]
        else:
            out.append(list(fields))
            runs = []
    return out


def parse_id(raw: Any) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> bytes:
    return b"%d-%d" % sid


class OwnerView:
    """The owner's accounting: each chunk's value bytes and the policy that orders them."""

    def __init__(self, policy_name: str, capacity_bytes: int) -> None:
        self.policy: EvictionPolicy = make_policy(policy_name)
        self.capacity_bytes = capacity_bytes
        self.sizes: dict[bytes, int] = {}
        self.by_prefix: dict[bytes, bytes] = {}  # a key's first HIT_KEY_BYTES -> the key (hit records)
        self.used = 0

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    def save(self, rec: Save) -> bool:
        """Account a stored chunk; False if the policy refuses it (it is then to be deleted)."""
        if rec.key in self.sizes:
            return True
        if not self.policy.admit(rec.key, rec.parent, rec.depth):
            return False
        self.sizes[rec.key] = rec.size
        self.by_prefix[rec.key[:HIT_KEY_BYTES]] = rec.key
        self.used += rec.size
        self.policy.insert(rec.key, rec.parent, rec.depth)
        return True

    def hits(self, rec: Hits) -> None:
        known = [k for k in (self.by_prefix.get(p) for p in rec.keys) if k is not None]
        if known:
            self.policy.touch(known)

    def _drop(self, key: bytes) -> None:
        self.used -= self.sizes.pop(key)
        prefix = key[:HIT_KEY_BYTES]
        if self.by_prefix.get(prefix) == key:
            del self.by_prefix[prefix]

    def forget(self, key: bytes) -> bool:
        if key not in self.sizes:
            return False
        self._drop(key)
        self.policy.remove(key)
        return True

    def victims(self) -> list[bytes]:
        """Evict (in the policy's order, tails before heads) until the accounted bytes fit."""
        out = []
        while self.used > self.capacity_bytes:
            key = self.policy.evict(_any)
            if key is None:
                break
            self._drop(key)
            out.append(key)
        return out


def _any(_key: bytes) -> bool:
    return True


class AccessLog:
    """One tier's side of owner-managed capacity: buffered records for every host, the replay and
    eviction for the owner. `step()` runs on the tier's background thread (or a test's)."""

    def __init__(self, tier: RedisTier) -> None:
        c = tier.config
        self.tier = tier
        self.owner = c.owner
        self.capacity_bytes = c.capacity_bytes
        self.maxlen = c.stream_maxlen
        tag = f"{{{c.namespace}:{tier._layout_id[:8].hex()}}}"  # one hash slot for the stream and the epoch
        self.stream = f"{tag}.accesses".encode()
        self.epoch_key = f"{tag}.epoch".encode()
        self.lease_key = f"{tag}.owner".encode()
        self._lease_ms = max(1, int(c.owner_lease_s * 1000))
        self._token = os.urandom(8).hex().encode()  # this owner's name in the lease
        self._lease_at = 0.0  # when this owner last took or renewed the lease (monotonic)
        self.report = OwnerReport()
        self._buffer: deque[list[bytes]] = deque()  # encoded records not yet sent, oldest first
        self._buffer_lock = threading.Lock()
        self._touch_interval = c.touch_interval_s
        self._touched: dict[bytes, float] = {}  # key -> when this host last recorded a hit on it
        # held while records are in flight, so they reach the stream in the order they were taken
        # (a child's save after its parent's): the background flush holds it; a chunk write takes
        # the records along only if it can have it at once
        self.send_lock = threading.Lock()
        self._step_lock = threading.Lock()  # one step at a time (the thread's, or a caller's)
        self.view: OwnerView | None = None
        self._last_id: StreamId = (0, 0)
        self._read_count = 0  # records the stream ever added up to _last_id (see _trimmed_past)
        self._epoch: bytes = b""
        self._run_id: bytes = b""  # the stream's server's INFO run_id at the last rescan (b"": unknown)
        self._doomed: list[bytes] = []  # victims whose DEL has not gone through yet
        # chunks a rescan adopted before their save record arrived (a host writes, then flushes its
        # records): that late record is of the write already accounted, not a new one
        self._adopted: set[bytes] = set()
        # chunks a rescan found but could not read (a resharding kept redirecting them): asked again
        # at each step until they answer, so none stays unaccounted until the next rescan
        self._unread: set[bytes] = set()
        self._next_rescan = 0.0

    # -- every host: records ------------------------------------------------------------------
    def record_hits(self, keys: Sequence[bytes]) -> None:
        if self._touch_interval > 0:
            keys = self._not_recently_touched(keys)
        if not keys:
            return
        run = tuple(bytes(k[:HIT_KEY_BYTES]) for k in keys)
        if len({len(k) for k in run}) == 1:
            self._append([encode_record(Hits(run))])
        else:  # keys of several lengths (never within one namespace): one record each, never an error here
            self._append([encode_record(Hits((k,))) for k in run])

    def _not_recently_touched(self, keys: Sequence[bytes]) -> list[bytes]:
        """`keys` less those this host recorded a hit on within touch_interval_s (as the shared
        folder's non-owners touch a file's mtime at most once per interval)."""
        now = time.monotonic()
        interval = self._touch_interval
        with self._buffer_lock:
            fresh = [k for k in keys if now - self._touched.get(k, -interval) >= interval]
            for k in fresh:
                self._touched[k] = now
            if len(self._touched) > 4 * MAX_BUFFERED:  # forget hits older than the interval
                self._touched = {k: t for k, t in self._touched.items() if now - t < interval}
        return fresh

    def record_save(self, key: bytes, parent: bytes | None, depth: int, size: int) -> None:
        self._append([encode_record(Save(bytes(key), bytes(parent) if parent else None, depth, size))])

    def _append(self, records: list[list[bytes]], front: bool = False) -> None:
        with self._buffer_lock:
            if front:
                self._buffer.extendleft(reversed(records))
            else:
                self._buffer.extend(records)
            while len(self._buffer) > MAX_BUFFERED:  # the oldest go first
                self._buffer.popleft()
                self.report.dropped += 1

    def take(self) -> list[tuple[Any, ...]]:
        """The buffered records as XADD commands (the buffer is emptied; `give_back` on failure)."""
        with self._buffer_lock:
            records, self._buffer = self._buffer, deque()
        return [("XADD", self.stream, "MAXLEN", "~", self.maxlen, "*", *fields) for fields in coalesce(records)]

    def give_back(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Records a failed exchange did not deliver: first in line for the next one."""
        self._append([list(cmd[6:]) for cmd in commands], front=True)

    def flush(self) -> bool:
        """Send the buffered records in one pipeline; False if the server could not take them."""
        with self.send_lock:
            commands = self.take()
            if not commands:
                return True
            route = self.tier._route_of(self.stream)
            replies = self.tier._exchange([(route, commands)], [0])[0] if route is not None else None
            return self.delivered(commands, replies)

    def delivered(self, commands: Sequence[tuple[Any, ...]], replies: Sequence[Any] | None) -> bool:
        """Settle an exchange of `commands` (XADDs of take()): records not delivered go back to the
        buffer; those the server refused (the stream's name holds another type, OOM) are dropped."""
        if replies is None:
            self.give_back(commands)
            return False
        bad = [r for r in replies if isinstance(r, Exception)]
        if bad:
            self.report.dropped += len(bad)
            log.warning("kvtier: %s tier: %d access records refused: %s", self.tier.name, len(bad), bad[0])
        return True

    # -- the owner ------------------------------------------------------------------------------
    def step(self) -> None:
        """Flush this host's records; the owner then replays the stream, evicts, and rescans when due."""
        with self._step_lock:
            self.flush()
            if not self.owner or not self._hold_lease():
                return
            due = self.tier.config.rescan_s > 0 and time.monotonic() >= self._next_rescan
            if (self.view is None or due) and not self._rescan():
                if self.view is None:
                    return
                # a periodic reconcile that could not ask every server (a lost cluster node): the
                # view goes on from the stream, and evicting on the nodes that answer goes on too
                self._next_rescan = time.monotonic() + min(self.tier.config.rescan_s, 30.0)
            while True:
                got = self._poll()
                if got is None:  # could not ask, or a rescan is needed and failed
                    break
                if got < READ_COUNT:
                    break
            self._read_unread()
            self._trim()

    def _hold_lease(self) -> bool:
        """Take or renew the owner lease (SET NX PX; PEXPIRE once half of it has run): whether this
        owner may replay and evict now. Another owner holding it: stand by, dropping the view (it
        is rebuilt on taking over). An unavailable server: no step."""
        replies = self._ask([("SET", self.lease_key, self._token, "NX", "PX", self._lease_ms),
                             ("GET", self.lease_key), ("PTTL", self.lease_key)])
        if replies is None:
            return False
        holder, ttl = replies[1], replies[2]
        if holder != self._token:
            self._lost_lease()  # a view left from before (a renewal found the lease gone) is dropped too
            return False
        if isinstance(ttl, int) and 0 <= ttl < self._lease_ms // 2 and not self._renew_lease():
            return False
        self._lease_at = time.monotonic()
        if not self.report.leader:
            self.report.leader = True
            log.info("kvtier: %s tier: this host holds the owner lease", self.tier.name)
        return True

    def _keep_lease(self) -> None:
        """Within a long rescan: renew the lease every third of it, so a standby does not take over
        a busy owner (if it did meanwhile, this owner learns it at its next renewal or trim)."""
        if time.monotonic() - self._lease_at > self._lease_ms / 3000:
            self._renew_lease()
            self._lease_at = time.monotonic()

    def _renew_lease(self) -> bool:
        """PEXPIRE the lease if it is still this owner's (one script); False when another owner
        holds it now: this one stands by. An unavailable server: True (the lease runs out)."""
        replies = self._ask([("EVAL", _RENEW_IF_MINE, 1, self.lease_key, self._token, self._lease_ms)])
        if replies is None or isinstance(replies[0], Exception):
            return True
        if replies[0] == 0:
            self._lost_lease()
            return False
        return True

    def _lost_lease(self) -> None:
        if self.report.leader:
            self.report.leader = False
            self.report.lease_lost += 1
            log.warning("kvtier: %s tier: another owner took the owner lease; this one stands by", self.tier.name)
        self.view = None
        self._doomed.clear()
        self._unread.clear()

    def _still_owner(self) -> bool:
        """Whether the lease is this owner's right now (asked just before evicting: an owner
        stalled past its lease must not delete what the next owner's view keeps)."""
        replies = self._ask([("GET", self.lease_key)])
        if replies is None:
            return False
        if replies[0] != self._token:
            self._lost_lease()
            return False
        return True

    def release(self) -> None:
        """Give the lease up (at close) so a standby owner takes over at its next step."""
        if not self.owner or not self.report.leader:
            return
        replies = self._ask([("GET", self.lease_key)])
        if replies is not None and replies[0] == self._token:
            self._ask([("DEL", self.lease_key)])
        self.report.leader = False

    def _ask(self, commands: list[tuple[Any, ...]]) -> list[Any] | None:
        route = self.tier._route_of(self.stream)
        return self.tier._exchange([(route, commands)], [0])[0] if route is not None else None

    def _poll(self) -> int | None:
        """Replay the next records; how many (None: server unavailable, or records were lost)."""
        # INFO outside the MULTI (a server that refuses it must not abort the read), on the same
        # connection: a restart between the two breaks the exchange
        replies = self._ask([("INFO", "server"), ("MULTI",), ("GET", self.epoch_key),
                             ("XINFO", "STREAM", self.stream),
                             ("XREAD", "COUNT", READ_COUNT, "STREAMS", self.stream, format_id(self._last_id)),
                             ("EXEC",)])
        if replies is None:
            return None
        result = replies[-1]
        if isinstance(result, Exception) or not isinstance(result, list) or len(result) != 3:
            log.warning("kvtier: %s tier: the owner's stream read failed: %s", self.tier.name, result)
            return None
        epoch, info, entries = result
        lost = self._lost(epoch, _run_id_of(replies[0]), info)
        if lost:
            log.warning("kvtier: %s tier: owner resyncs: %s", self.tier.name, lost)
            self.report.resyncs += 1
            self._rescan(fresh=True)
            return None
        n = 0
        streams = entries.values() if isinstance(entries, dict) else [items for _name, items in entries or ()]
        for items in streams:  # XREAD's reply: a RESP3 map or a RESP2 list of (stream, entries)
            for sid, fields in items:
                for record in decode_entry(fields):
                    self._apply(record)
                self._last_id = parse_id(sid)
                n += 1
        self.report.applied += n
        self._read_count += n
        return n

    def _lost(self, epoch: Any, run_id: bytes, info: Any) -> str:
        """Why the owner's view or its stream position no longer holds ("" if they do), from the
        epoch key, INFO server's run_id and XINFO STREAM's reply (an error: no stream): the server
        lost its data or restarted (from an older snapshot, its keys are not the view's), or the
        stream lost records the owner had not read or went back behind its position (a new
        stream's ids may be below the old last id: an XREAD from there would skip its records)."""
        if epoch != self._epoch:
            return "the server lost the owner's epoch key (restarted or flushed)"
        if run_id and self._run_id and run_id != self._run_id:
            return (f"the stream's server restarted or changed (run_id {self._run_id[:8].decode(errors='replace')} "
                    f"is now {run_id[:8].decode(errors='replace')})")
        position = format_id(self._last_id).decode()
        if isinstance(info, Exception):
            return f"the stream is gone (the owner had read to {position})" if self._last_id != (0, 0) else ""
        fields = _info_fields(info)
        last = fields.get(b"last-generated-id")
        if last is not None and parse_id(last) < self._last_id:
            return f"the stream went back to {format_id(parse_id(last)).decode()}, behind the owner's {position}"
        added = fields.get(b"entries-added")
        if isinstance(added, int) and added < self._read_count:
            return f"the stream added {added} records, fewer than the {self._read_count} the owner has read"
        return self._trimmed_past(fields)

    def _trimmed_past(self, fields: dict[bytes, Any]) -> str:
        """Why records after the owner's last id are gone ("" if none are), from XINFO STREAM's
        reply taken atomically with the XREAD: the stream added `entries-added` records and holds
        `length`, so the oldest entries-added - length were trimmed; the owner has read (or its
        last rescan covered) the first `_read_count`. (XTRIM does not move max-deleted-entry-id.)"""
        added, length = fields.get(b"entries-added"), fields.get(b"length")
        if isinstance(added, int) and isinstance(length, int):  # Redis 7
            if added - length > self._read_count:
                return (f"the stream was trimmed past the owner's last id {format_id(self._last_id).decode()} "
                        f"({added - length - self._read_count} records unread)")
            return ""
        first = fields.get(b"first-entry")  # older servers: the entry the owner read last is gone
        if first and self._last_id != (0, 0) and parse_id(first[0]) > self._last_id:
            return f"the stream's first entry is past the owner's last id {format_id(self._last_id).decode()}"
        return ""

    def _apply(self, record: Save | Hits) -> None:
        view = self.view
        if view is None:
            return
        if isinstance(record, Save):
            if record.key in self._adopted:
                self._adopted.discard(record.key)
                if record.key not in view:
                    # the late record of a write a rescan adopted and this owner has evicted since:
                    # saved again it would be a chunk accounted but gone, and a real one evicted for it
                    return
            if not view.save(record):
                self._doomed.append(record.key)
        else:
            view.hits(record)

    def _trim(self) -> None:
        view = self.view
        if view is None:
            return
        self._doomed.extend(view.victims())
        if not self._doomed:
            return
        if not self._still_owner():
            return
        doomed, self._doomed = self._doomed, []
        rkeys = [self.tier.redis_key(k) for k in doomed]
        replies = self.tier._pipelined(rkeys, lambda i: [("DEL", rkeys[i])])
        evicted = 0
        for key, reply in zip(doomed, replies):
            if not isinstance(reply, list) or isinstance(reply[0], Exception):
                # not asked, or refused (MOVED/ASK/TRYAGAIN while a cluster reshards: the slot map is
                # reloaded): deleted at the next step, never forgotten while it is still stored
                self._doomed.append(key)
            elif reply[0] == 1:
                evicted += 1
            else:
                self.report.vanished += 1  # gone already (a non-owner dropped it as corrupt, a lost node)
        self.report.evicted += evicted
        if evicted:
            self.tier.metrics.inc(m.EVICTIONS, evicted, tier=self.tier.name)
        self._report_usage()

    def _report_usage(self) -> None:
        if self.view is not None:
            self.report.used_bytes, self.report.chunks = self.view.used, len(self.view.sizes)
            self.tier.metrics.set(m.USED_BYTES, self.view.used, tier=self.tier.name)

    def _rescan(self, fresh: bool = False) -> bool:
        """Build (at start, `fresh` on a resync) or reconcile (periodically) the view from the keys
        the servers hold; False if a server could not be asked (the owner then evicts nothing
        until a later step's rescan succeeds).

        A build orders what it finds as the stream remembers it: chunks with no save record left
        first (older than any record, parents first), then the retained records up to the point of
        the scan replayed in order (saves of chunks still there, and hits), and the stream is then
        followed from that point. A reconcile keeps the view and its order, adopts chunks it did
        not know and forgets chunks that are gone; but where the server restarted or the stream
        lost records since the last step (`_lost`: a reconcile must not take the new epoch key it
        set as its own), it is a resync: a build, the stream then read from the point of the scan."""
        token = os.urandom(8).hex().encode()
        head = self._ask([("SET", self.epoch_key, token, "NX"), ("GET", self.epoch_key),
                          ("XINFO", "STREAM", self.stream), ("INFO", "server")])
        if head is None or isinstance(head[1], Exception) or not head[1]:
            return False
        info = {} if isinstance(head[2], Exception) else _info_fields(head[2])  # an error: no stream yet
        scan_id = parse_id(info.get(b"last-generated-id", b"0-0"))
        scan_count = info.get(b"entries-added", 0)
        run_id = _run_id_of(head[3])
        build = fresh or self.view is None
        lost = "" if build else self._lost(head[1], run_id, head[2])
        if lost:
            log.warning("kvtier: %s tier: owner resyncs: %s", self.tier.name, lost)
            self.report.resyncs += 1
            build = True
        found = self._scan_keys()
        if found is None:
            return False
        view = OwnerView(self.tier.config.policy, self.capacity_bytes) if build else self.view
        assert view is not None
        if not build:
            for key in [k for k in view.sizes if k not in found]:
                view.forget(key)
                self.report.vanished += 1
        elif self.view is not None:
            self.report.vanished += sum(1 for k in self.view.sizes if k not in found)
        got = self._read_headers([k for k in found if k not in view])
        if got is None:
            return False
        new, unread = got
        history: list[Save | Hits] = []
        if build:
            retained = self._read_history(scan_id)
            if retained is None:
                return False
            history = retained
        recorded = {r.key for r in history if isinstance(r, Save)}
        if build or len(self._adopted) > MAX_ADOPTED:
            self._adopted.clear()  # bounded: a record skipped wrongly costs only accounting, which rescans repair
        self._adopt(view, [r for r in new if r.key not in recorded])
        sizes = {r.key: r.size for r in new}
        for record in history:
            if isinstance(record, Hits):
                view.hits(record)
            elif record.key in sizes and not view.save(Save(record.key, record.parent, record.depth,
                                                           sizes[record.key])):
                self._doomed.append(record.key)
        if build:
            self._last_id, self._read_count = scan_id, int(scan_count) if isinstance(scan_count, int) else 0
        self.view, self._epoch, self._run_id, self._unread = view, head[1], run_id, unread
        self.report.rescans += 1
        self.report.synced = True
        self._next_rescan = time.monotonic() + self.tier.config.rescan_s
        self._report_usage()
        return True

    def _adopt(self, view: OwnerView, found: list[Save]) -> None:
        """Account chunks found stored whose save record the owner has not read (parents first):
        the record, if it arrives later, is of this write, not a new one."""
        for rec in sorted(found, key=lambda r: r.depth):
            self._adopted.add(rec.key)
            if not view.save(rec):
                self._doomed.append(rec.key)

    def _read_unread(self) -> None:
        """Ask again for the chunks a rescan found but could not read (a resharding kept
        redirecting them, or to a node the slot map did not know yet), and adopt those that answer."""
        view = self.view
        if view is None or not self._unread:
            return
        got = self._read_headers([k for k in self._unread if k not in view])
        if got is None:
            return  # a server could not be asked: at the next step
        found, self._unread = got
        self._adopt(view, found)
        self._report_usage()

    def _read_history(self, upto: StreamId) -> list[Save | Hits] | None:
        """The records the stream still holds up to `upto`, oldest first (XRANGE, in batches)."""
        out: list[Save | Hits] = []
        if upto == (0, 0):
            return out
        start = b"-"
        while True:
            replies = self._ask([("XRANGE", self.stream, start, format_id(upto), "COUNT", READ_COUNT)])
            if replies is None:
                return None
            items = replies[0]
            if isinstance(items, Exception):
                return out  # the name holds no stream (another type): nothing to learn from
            for sid, fields in items:
                out.extend(decode_entry(fields))
                start = b"(" + bytes(sid)
            if len(items) < READ_COUNT:
                return out

    def _scan_keys(self) -> set[bytes] | None:
        """Every chunk key of this tier (namespace and layout) on every primary, by SCAN."""
        tier = self.tier
        prefix = tier._prefix
        pattern = _glob_escape(prefix) + b"*"
        found: set[bytes] = set()
        routes = [tier._single] if tier._single is not None else tier._primaries()
        if not routes:
            return None
        for route in routes:
            if route is None or not route.breaker.allow():
                return None
            cursor = 0
            try:
                while True:
                    cursor, names = route.client.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
                    self._keep_lease()
                    for name in names:
                        raw = name if isinstance(name, bytes) else str(name).encode()
                        try:
                            found.add(bytes.fromhex(raw[len(prefix):].decode()))
                        except ValueError:
                            continue  # not a chunk name kvtier writes
                    if cursor == 0:
                        break
            except (RedisError, OSError) as e:
                route.breaker.failed()
                log.warning("kvtier: %s tier: owner's scan of %s failed: %s", tier.name, route.name, e)
                return None
            route.breaker.succeeded()
        return found

    def _read_headers(self, keys: list[bytes]) -> tuple[list[Save], set[bytes]] | None:
        """Each key's parent, depth (its verified header) and value size, corrupt values deleted;
        and the keys left unread. A key whose slot is moving (a resharding: MOVED, or ASK while the
        slot migrates) is asked again at the node the answer names, up to MAX_REDIRECTS times; one
        still unanswered is left unread (the owner asks again at its next steps), never skipped.
        None if a server could not be asked."""
        tier = self.tier
        out: list[Save] = []
        unread: set[bytes] = set()
        for start in range(0, len(keys), SCAN_COUNT):
            self._keep_lease()
            batch = keys[start:start + SCAN_COUNT]
            rkeys = [tier.redis_key(k) for k in batch]
            replies = [r for r in tier._pipelined(rkeys, partial(_size_and_header, rkeys, tier._kv_header))
                       if isinstance(r, list)]
            if len(replies) != len(batch):
                return None
            answers = list(zip(batch, rkeys, replies))
            for hop in range(MAX_REDIRECTS + 1):
                redirected: list[tuple[bytes, bytes, ResponseError]] = []
                for key, rkey, (size, data) in answers:
                    moved = next((r for r in (size, data) if isinstance(r, (AskError, TryAgainError))), None)
                    if moved is not None:
                        redirected.append((key, rkey, moved))
                        continue
                    try:
                        rec = self._saved(key, rkey, size, data)
                    except _AskAgain:
                        unread.add(key)
                        continue
                    if rec is not None:
                        out.append(rec)
                if not redirected:
                    break
                if hop == MAX_REDIRECTS:
                    unread.update(key for key, _rkey, _e in redirected)
                    break
                answers = self._ask_redirected(redirected, unread)
        return out, unread

    def _saved(self, key: bytes, rkey: bytes, size: Any, data: Any) -> Save | None:
        """The record of a stored chunk from its STRLEN and header GETRANGE replies; None for a
        value that is not this tier's chunk (gone since the scan, another type or layout, corrupt:
        deleted); _AskAgain when the rest of a long header could not be read now."""
        from kvtier.tiers.redis import _Foreign

        tier = self.tier
        if isinstance(size, ResponseError) or not size:
            return None  # another type (dropped below when read), or gone since the scan
        try:
            raw = tier._full_header(rkey, data)
        except KeyError:
            raise _AskAgain() from None  # its server could not be asked for the rest of the header
        if isinstance(raw, (AskError, TryAgainError)):
            raise _AskAgain()  # the slot moved between the two reads
        try:
            header, _kv = tier._header(key, raw, int(size))
        except KeyError:
            return None
        except CorruptChunkError as e:
            self.report.corrupt += 1
            tier._drop_corrupt(rkey, e, [(0, data)] if isinstance(data, bytes) else None, int(size))
            return None
        except _Foreign:  # another layout under a colliding name: not this tier's to account
            return None
        return Save(key, header.parent, header.depth, int(size))

    def _ask_redirected(self, redirected: list[tuple[bytes, bytes, ResponseError]],
                        unread: set[bytes]) -> list[tuple[bytes, bytes, list[Any]]]:
        """The STRLEN and header GETRANGE replies of each (key, name, redirection) from the node its
        MOVED or ASK answer names (after ASKING for an ASK: the slot is still the other node's
        until its migration ends), one pipeline per node; keys that cannot be asked there
        (TRYAGAIN, a node the slot map does not know, a node that does not answer) go to `unread`."""
        tier = self.tier
        groups: dict[tuple[str, bool], tuple[_Route, bool, list[tuple[bytes, bytes]]]] = {}
        for key, rkey, err in redirected:
            route = tier._route_at(err.host, err.port) if isinstance(err, AskError) else None
            if route is None:
                unread.add(key)
                continue
            asking = not isinstance(err, MovedError)
            groups.setdefault((route.name, asking), (route, asking, []))[2].append((key, rkey))
        jobs = []
        for route, asking, items in groups.values():
            cmds: list[tuple[Any, ...]] = []
            for _key, rkey in items:
                ask = _size_and_header([rkey], tier._kv_header, 0)
                cmds.extend([("ASKING",), ask[0], ("ASKING",), ask[1]] if asking else ask)
            jobs.append((route, cmds))
        results = tier._exchange(jobs, [len(items) for _route, _asking, items in groups.values()])
        out: list[tuple[bytes, bytes, list[Any]]] = []
        for (_route, asking, items), replies in zip(groups.values(), results):
            if replies is None:
                unread.update(key for key, _rkey in items)
                continue
            per = 4 if asking else 2
            for i, (key, rkey) in enumerate(items):
                got = replies[i * per:(i + 1) * per]
                out.append((key, rkey, got[1::2] if asking else got))
        return out


class _AskAgain(Exception):
    """A chunk's value could not be read now (its slot is moving): to be asked again."""


def _size_and_header(rkeys: Sequence[bytes], header_bytes: int, i: int) -> list[tuple[Any, ...]]:
    """The commands that read key i's value size and header."""
    return [("STRLEN", rkeys[i]), ("GETRANGE", rkeys[i], 0, header_bytes - 1)]


def _run_id_of(info: Any) -> bytes:
    """The run_id in INFO server's reply (a server's, new at each start); b"" when it is not there."""
    text = info.encode() if isinstance(info, str) else info
    if not isinstance(text, bytes):
        return b""
    for line in text.splitlines():
        if line.startswith(b"run_id:"):
            return line[7:].strip()
    return b""


def _info_fields(info: Any) -> dict[bytes, Any]:
    """XINFO STREAM's reply as a dict: a RESP3 map, or RESP2's flat list of names and values."""
    if isinstance(info, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in info.items()}
    return {bytes(info[i]): info[i + 1] for i in range(0, len(info) - 1, 2)}


def _glob_escape(name: bytes) -> bytes:
    """`name` as a SCAN MATCH pattern that matches it literally."""
    text = name.decode("latin-1")
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text).encode("latin-1")


__all__ = ["AccessLog", "Hits", "OwnerReport", "OwnerView", "Save", "coalesce", "decode_entry", "encode_record"]
