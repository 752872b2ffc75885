"""Redis tier: one key per chunk on a Redis/Valkey server or a Redis Cluster shared by many hosts.

Who calls: the TieredStore (StoreConfig.lower_tiers) from its I/O threads and its lower-tier
writer thread, in-process or inside `kvtier serve`. Needs the `redis` extra (redis-py with the
hiredis parser).

    lookup(keys) -> int          one pipelined EXISTS per key (per cluster node); the leading run
    read_many(keys, layers, d)   one pipelined GET (whole chunks) or GETRANGEs of the header and
                                 the asked layers (layer-wise loads) per key, per node
    write(meta, layers)          SET NX [PX ttl] of the whole chunk (content-addressed: idempotent)
    delete(key), usage(), close(); touch() is a no-op (the server's LRU sees every read), or in
                                 owner-managed mode buffers a hit record for the owner
    owner_step(), owner_report()  owner-managed mode: one step now; what it has done

Key: b"<namespace>:<layout id, 8 bytes hex>:<chunk key hex>". Value: exactly the bytes a disk
tier file holds (core/codec.py: the 4 KiB header, then each section 4 KiB-aligned with its own
xxh3 checksum), so a reader verifies every section it copies and can fetch one layer alone
with GETRANGE. No pickle: a value that is not a kvtier chunk of this layout is a miss.

Capacity and eviction belong to the server (`capacity_bytes` 0, the default) or to one owner host
(`capacity_bytes` > 0, recommended: tiers/redis_owner.py; every host buffers its saves and hits as
records for a Redis Stream, touch() included, and sends them with its next write's pipeline or
from a background thread every `flush_s`; the owner replays them into kvtier's policy and DELs
victims). Server-managed mode: `maxmemory`, `maxmemory-policy allkeys-lru` and
`maxmemory-samples 64` (core.config.REDIS_RECOMMENDED_SETTINGS; the tier logs a warning at start
where a server's settings differ, if the server lets it read them). Measured by `kvtier bench
fleet` on the Mooncake trace (its `redis` column models these settings): Redis's default 5
samples evict far from LRU order and lose whole prefixes (0.78x of one host with the fleet's
DRAM at 4 hosts, against 0.87x with 64 samples); allkeys-lfu does worse (0.71x with 64 samples:
its counters decay by the minute, so recency is coarse, and a new key starts above keys idle for
minutes). With MiB-sized chunks evictions are few per byte, so 64 samples cost no measurable CPU.
A chunk whose parent the server evicted is still stored but never served as a prefix: lookups
stop at the first missing key. Corrupt values (bad magic, header or section checksum, a key that
does not match the name, a value of another type) are counted as checksum failures, deleted and
missed; a chunk of another KV layout under a colliding name is counted (`foreign_chunks`) and
missed but left for its owner.

Faults never block or crash the caller: every command runs with a connect and a read timeout
and no retries, and each server (each cluster node) has a circuit breaker. After
`breaker_failures` consecutive failures the node's requests are misses at once, without
touching the network, until a back-off (doubling from `backoff_s` to `max_backoff_s`) lets one
trial request through; its success closes the breaker. A request for one node therefore
stalls at most connect_timeout_s + timeout_s, and a dead, paused or restarted server, or a lost
cluster node, turns into misses (the other cluster nodes keep serving when the cluster runs
with `cluster-require-full-coverage no`); the tier recovers by itself when the server answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from kvtier.core import metrics as m
from kvtier.core.codec import SECTION_KV, ChunkHeader, Section, checksum, decode_header, encode_header, header_size
from kvtier.core.config import REDIS_RECOMMENDED_SETTINGS, RedisTierConfig
from kvtier.core.errors import CorruptChunkError, NewerFormatError, StoreClosedError, TierUnavailableError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import (
    Buffer,
    ChunkMeta,
    Tier,
    TierUsage,
    TierWriteError,
    check_dests,
    chunk_sections,
)
from kvtier.tiers.redis_owner import AccessLog, OwnerReport

log = logging.getLogger(__name__)

# A server or node that cannot answer: these open the breaker. Anything else a command returns
# (WRONGTYPE, MOVED, OOM) concerns that one key and is a miss or a failed write on its own.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ClusterDownError, OSError)


# Delete KEYS[1] only if it is still ARGV[1] bytes long (when ARGV[1] >= 0) and each (offset,
# length, sha1 hex) triple after that still names what it holds: the value a reader found
# corrupt (its header and the part that failed), not a valid one stored under the name since.
_DELETE_IF_SAME = """
local n = tonumber(ARGV[1])
if n >= 0 and redis.call('STRLEN', KEYS[1]) ~= n then return 0 end
for i = 2, #ARGV, 3 do
  local off = tonumber(ARGV[i])
  local got = redis.call('GETRANGE', KEYS[1], off, off + tonumber(ARGV[i + 1]) - 1)
  if redis.sha1hex(got) ~= ARGV[i + 2] then return 0 end
end
return redis.call('DEL', KEYS[1])
"""


class _CorruptValue(CorruptChunkError):
    """A value that failed validation, with what the reader saw of it: (offset, bytes) pieces
    (its header and the part that failed), and its length where the read knew it."""

    def __init__(self, message: str, seen: Sequence[tuple[int, Any]], size: int | None = None) -> None:
        super().__init__(message)
        self.seen = [(off, bytes(b)) for off, b in seen]
        self.size = size


class _Foreign(Exception):
    """A value of another KV layout under this tier's name for a key: miss, do not delete."""


class CircuitBreaker:
    """Closed until `failures` consecutive failures; then open, letting one trial through after a
    back-off that doubles per failed trial, up to `max_backoff_s`. A trial whose outcome is never
    reported (its caller raised) stops blocking others after one more back-off. Thread-safe."""

    def __init__(self, failures: int, backoff_s: float, max_backoff_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0  # while open: no request before this time
        self._backoff = backoff_s
        self._trial_until = 0.0  # while a trial request tests an open breaker: no other before this

    @property
    def is_open(self) -> bool:
        return self._failures >= self.failures_to_open

    def allow(self) -> bool:
        with self._lock:
            if self._failures < self.failures_to_open:
                return True
            now = self._clock()
            if now < self._open_until or now < self._trial_until:
                return False
            self._trial_until = now + self._backoff
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._backoff = self.backoff_s
            self._trial_until = 0.0

    def failed(self) -> None:
        with self._lock:
            was_trial = self._trial_until > 0.0
            self._trial_until = 0.0
            self._failures += 1
            if self._failures >= self.failures_to_open:
                if was_trial:
                    self._backoff = min(self._backoff * 2, self.max_backoff_s)
                self._open_until = self._clock() + self._backoff


@dataclass(slots=True)
class _Route:
    """One server (or cluster primary) and its breaker."""

    name: str
    client: redis.Redis
    breaker: CircuitBreaker


def _no_setinfo() -> dict[str, Any]:
    """Client arguments that turn off CLIENT SETINFO (redis-py 8 spells it driver_info=None)."""
    import inspect

    params = inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    if "driver_info" in params:
        return {"driver_info": None}
    if "lib_name" in params:
        return {"lib_name": None, "lib_version": None}
    return {}


_NO_SETINFO = _no_setinfo()

# A lookup in one round trip per server: how many of KEYS (in chain order) exist before the first
# that does not. The flags let a cluster node take keys of several of its slots at once (Redis 7+,
# Valkey); a server that refuses the script is asked with pipelined EXISTS instead.
_LOOKUP_SCRIPT = """#!lua flags=no-writes,allow-cross-slot-keys
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then return i - 1 end
end
return #KEYS
"""
_LOOKUP_SHA = hashlib.sha1(_LOOKUP_SCRIPT.encode()).hexdigest()
_NO_VALUE = object()  # the request could not be made (breaker open, server unavailable)


class RedisTier(Tier):
    name = "redis"

    def __init__(self, layout: KVLayout, chunk_tokens: int, config: RedisTierConfig,
                 metrics: m.Metrics | None = None, *, name: str = "redis") -> None:
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.config = config
        self.metrics = metrics or m.Metrics()
        self.name = name
        self._layout_id = layout.layout_id(chunk_tokens)
        self._prefix = redis_key_name(config.namespace, self._layout_id, b"")
        self._kv_header = header_size(layout.num_layers)  # a chunk without extra sections
        self._closed = False
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._cluster: Any = None  # redis.cluster.RedisCluster, for slots and nodes only
        self._cluster_breaker = CircuitBreaker(config.breaker_failures, config.backoff_s, config.max_backoff_s)
        self.foreign_chunks = 0
        self.settings_warnings: list[str] = []  # how the server's eviction settings differ from the recommended
        self._scripted_lookup = True  # until a server refuses the script
        self._refreshing = False  # a slot-map reload is running in the background
        self._next_refresh = 0.0  # no other reload before this (monotonic seconds)
        self._client_kwargs: dict[str, Any] = dict(
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            socket_read_size=1 << 18,  # chunks are MiBs: fewer, larger reads (+35% on 2 MiB values)
            retry=Retry(NoBackoff(), 0),  # one attempt: the breaker, not a retry loop, handles faults
            retry_on_timeout=False,
            health_check_interval=0,
            **_NO_SETINFO,  # no CLIENT SETINFO on connect: a paused server costs one timeout, not two
        )
        if not HIREDIS_AVAILABLE:
            log.warning("kvtier: %s tier: hiredis is not installed; redis-py parses replies in Python "
                        "(pip install 'kvtier[redis]' brings the C parser)", self.name)
        self._single: _Route | None = None
        self._access: AccessLog | None = None  # owner-managed mode's records (and replay, on the owner)
        self._stop = threading.Event()
        self._access_thread: threading.Thread | None = None
        try:
            if config.cluster:
                self._connect_cluster(at_start=True)
            else:
                client = redis.Redis.from_url(config.url, max_connections=config.max_connections,
                                              **self._client_kwargs)
                self._single = _Route(_url_name(config.url), client, self._new_breaker())
                self._check_single_at_start()
        except ValueError as e:
            raise TierUnavailableError(f"{self.name}.url {config.url!r} does not parse: {e}") from None
        if config.capacity_bytes:
            self._access = AccessLog(self)
            self._access_thread = threading.Thread(target=self._access_loop, name="kvtier-redis-accesses",
                                                   daemon=True)
            self._access_thread.start()

    # -- connections ---------------------------------------------------------------------
    def _new_breaker(self) -> CircuitBreaker:
        c = self.config
        return CircuitBreaker(c.breaker_failures, c.backoff_s, c.max_backoff_s)

    def _check_single_at_start(self) -> None:
        assert self._single is not None
        try:
            self._single.client.ping()
        except AuthenticationError as e:  # a ConnectionError to redis-py, but no outage: a wrong password
            raise TierUnavailableError(
                f"{self.name}: Redis at {self._single.name} refused kvtier's credentials: {e}") from None
        except _UNAVAILABLE as e:
            if not self.config.start_degraded:
                raise TierUnavailableError(
                    f"{self.name}: cannot reach Redis at {self._single.name}: {e} "
                    "(set start_degraded to start with misses until it answers)") from None
            log.warning("kvtier: %s tier starts degraded: %s unreachable (%s)", self.name, self._single.name, e)
            for _ in range(self.config.breaker_failures):
                self._single.breaker.failed()
        except RedisError as e:
            raise TierUnavailableError(f"{self.name}: Redis at {self._single.name} refused kvtier: {e}") from None
        if self.config.cluster is False and not self._single.breaker.is_open:
            try:
                cluster_on = self._single.client.info("cluster").get("cluster_enabled") == 1
            except RedisError:
                cluster_on = False
            if cluster_on:
                raise TierUnavailableError(
                    f"{self.name}: {self._single.name} is a Redis Cluster node; set cluster: true")
            self._check_eviction_settings(self._single.name, self._single.client)

    def _check_eviction_settings(self, name: str, client: Any) -> None:
        """Warn (once, at start) where the server's eviction settings differ from kvtier's
        recommendation (REDIS_RECOMMENDED_SETTINGS): no memory bound, a policy that never evicts
        kvtier's keys, or fewer LRU samples. Best effort: a server that refuses CONFIG GET (an ACL,
        a managed service) is not checked. The findings stay in `settings_warnings`."""
        try:
            got = {}
            for param in ("maxmemory", "maxmemory-policy", "maxmemory-samples"):
                reply = client.config_get(param)
                got[param] = str(reply.get(param, reply.get(param.encode(), "")))
        except (RedisError, OSError) as e:
            log.debug("kvtier: %s tier: cannot read %s's eviction settings: %s", self.name, name, e)
            return
        want = REDIS_RECOMMENDED_SETTINGS
        found: list[str] = []
        cap = self.config.capacity_bytes
        if cap and not self.config.cluster and got["maxmemory"].isdigit() and 0 < int(got["maxmemory"]) <= cap:
            found.append(f"maxmemory {got['maxmemory']} is not above capacity_bytes {cap}: the server evicts "
                         "before kvtier's owner does (set it above capacity_bytes, as a backstop)")
        if got["maxmemory"] in ("0", ""):
            found.append("maxmemory is 0: the server has no memory bound and never evicts")
        policy = got["maxmemory-policy"]
        if policy == "noeviction" or policy.startswith("volatile-"):
            found.append(f"maxmemory-policy {policy} never evicts kvtier's chunks (they have no TTL unless "
                         f"ttl_s is set): a full server refuses writes")
        elif policy != want["maxmemory-policy"]:
            found.append(f"maxmemory-policy {policy} (kvtier recommends {want['maxmemory-policy']})")
        if policy.endswith("-lru") and got["maxmemory-samples"].isdigit() and (
                int(got["maxmemory-samples"]) < int(want["maxmemory-samples"])):
            found.append(f"maxmemory-samples {got['maxmemory-samples']} (kvtier recommends "
                         f"{want['maxmemory-samples']}: a closer LRU keeps more prefixes whole)")
        self.settings_warnings.extend(f"{name}: {w}" for w in found)
        if found:
            log.warning("kvtier: %s tier: Redis at %s: %s", self.name, name, "; ".join(found))

    def _connect_cluster(self, at_start: bool = False) -> Any:
        """The RedisCluster (slot map and node clients), built on first use; None while unreachable."""
        if self._cluster is not None:
            return self._cluster
        if not at_start and not self._cluster_breaker.allow():
            return None
        with self._lock:  # one thread discovers the cluster; the others wait and use it
            if self._cluster is not None:
                return self._cluster
            return self._discover_cluster(at_start)

    def _discover_cluster(self, at_start: bool) -> Any:
        from redis.cluster import RedisCluster

        try:
            cluster = RedisCluster.from_url(
                self.config.url, require_full_coverage=False, max_connections=self.config.max_connections,
                **self._client_kwargs)
        except (RedisClusterException, RedisError, OSError) as e:
            unreachable = isinstance(e, _UNAVAILABLE) or "connect" in str(e).lower()
            if at_start and not (unreachable and self.config.start_degraded):
                raise TierUnavailableError(f"{self.name}: Redis Cluster at {self.config.url} refused: {e}") from None
            self._cluster_breaker.failed()
            log.warning("kvtier: %s tier: Redis Cluster at %s unreachable (%s)", self.name, self.config.url, e)
            return None
        self._cluster_breaker.succeeded()
        self._cluster = cluster
        if at_start:
            for node in cluster.get_primaries():
                self._check_eviction_settings(node.name, cluster.get_redis_connection(node))
        return cluster

    def _route_of(self, rkey: bytes) -> _Route | None:
        if self._single is not None:
            return self._single
        cluster = self._connect_cluster()
        if cluster is None:
            return None
        try:
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(rkey))
        except (SlotNotCoveredError, RedisClusterException, IndexError):
            return None  # a slot no live primary serves (its master was lost): a miss
        return self._route_of_node(cluster, node)

    def _route_at(self, host: str, port: int) -> _Route | None:
        """The route of the cluster node at host:port, as a MOVED or ASK reply names it; None for a
        single server, or a node the slot map does not know (yet: a reload is requested)."""
        if self._single is not None:
            return None
        cluster = self._connect_cluster()
        if cluster is None:
            return None
        node = cluster.get_node(host=host, port=port)
        if node is None:
            self._request_refresh()
            return None
        return self._route_of_node(cluster, node)

    def _route_of_node(self, cluster: Any, node: Any) -> _Route:
        route = self._routes.get(node.name)
        if route is None:
            with self._lock:
                route = self._routes.get(node.name)
                if route is None:
                    route = _Route(node.name, cluster.get_redis_connection(node), self._new_breaker())
                    self._routes[node.name] = route
        return route

    def _group(self, rkeys: Sequence[bytes]) -> tuple[dict[str, tuple[_Route, list[int]]], list[int]]:
        """Indices of `rkeys` by the route serving them; and those no route serves."""
        groups: dict[str, tuple[_Route, list[int]]] = {}
        orphans: list[int] = []
        for i, rkey in enumerate(rkeys):
            route = self._route_of(rkey)
            if route is None:
                orphans.append(i)
                continue
            groups.setdefault(route.name, (route, []))[1].append(i)
        return groups, orphans

    def _pipelined(self, rkeys: Sequence[bytes],
                   commands: Callable[[int], list[tuple[Any, ...]]]) -> list[list[Any] | object]:
        """Run key i's commands (commands(i), as argument tuples) on the route serving key i, one
        batch per route (see _exchange).

        Returns each key's raw replies (a list; an item may be a ResponseError for that command)
        or _NO_VALUE when its node could not be asked (breaker open, unreachable, timed out)."""
        out: list[list[Any] | object] = [_NO_VALUE] * len(rkeys)
        groups, orphans = self._group(rkeys)
        jobs: list[tuple[_Route, list[tuple[Any, ...]]]] = []
        splits: list[list[tuple[int, int]]] = []
        for route, indices in groups.values():
            cmds: list[tuple[Any, ...]] = []
            split = []
            for i in indices:
                key_cmds = commands(i)
                cmds.extend(key_cmds)
                split.append((i, len(key_cmds)))
            jobs.append((route, cmds))
            splits.append(split)
        results = self._exchange(jobs, [len(ix) for _r, ix in groups.values()], len(orphans))
        for replies, split in zip(results, splits):
            if replies is None:
                continue
            pos = 0
            for i, n in split:
                out[i] = replies[pos:pos + n]
                pos += n
        return out

    def _exchange(self, jobs: Sequence[tuple[_Route, list[tuple[Any, ...]]]], keys_per_job: Sequence[int],
                  unavailable: int = 0) -> list[list[Any] | None]:
        """Send every route its commands in one write, all routes before reading any reply, then
        read the replies route by route: a cluster's nodes work in parallel, and a paused node
        costs one timeout, not one per node. None for a route that could not be asked; a
        command's own error (WRONGTYPE, MOVED, OOM) is its reply. `unavailable` more keys are
        counted as unanswered (keys of slots no node serves)."""
        out: list[list[Any] | None] = [None] * len(jobs)
        sent: list[tuple[int, _Route, Any, int]] = []
        failed_routes = 0
        for j, (route, cmds) in enumerate(jobs):
            if not route.breaker.allow():
                unavailable += keys_per_job[j]
                continue
            pool = route.client.connection_pool
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
            except MaxConnectionsError:  # this process's own threads hold every connection: busy, not down
                unavailable += keys_per_job[j]  # misses now; the breaker is for servers that fail
                log.debug("kvtier: %s tier: %s: every pooled connection is in use (max_connections)",
                          self.name, route.name)
                continue
            except (*_UNAVAILABLE, RedisError) as e:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                route.breaker.failed()
                failed_routes += 1
                unavailable += keys_per_job[j]
                log.debug("kvtier: %s tier: %s unavailable: %s", self.name, route.name, e)
                continue
            sent.append((j, route, conn, len(cmds)))
        refresh = False
        for j, route, conn, count in sent:
            replies: list[Any] = []
            try:
                for _ in range(count):
                    try:
                        replies.append(conn.read_response())
                    except ResponseError as e:
                        replies.append(e)
                        refresh = refresh or isinstance(e, (AskError, TryAgainError))  # MovedError too
            except (*_UNAVAILABLE, RedisError) as e:
                conn.disconnect()  # replies may still be in flight: never reuse this connection
                route.breaker.failed()
                failed_routes += 1
                unavailable += keys_per_job[j]
                log.debug("kvtier: %s tier: %s unavailable: %s", self.name, route.name, e)
                continue
            finally:
                route.client.connection_pool.release(conn)
            route.breaker.succeeded()
            out[j] = replies
        if unavailable:
            self.metrics.inc(m.TIER_UNAVAILABLE, unavailable, tier=self.name)
        if refresh or (failed_routes and self._cluster is not None):
            self._request_refresh()
        return out

    def _request_refresh(self) -> None:
        """Reload the cluster's slot map on a background thread, at most once per `backoff_s`:
        after MOVED/ASK (a resharding) or a node that failed (a replica may have taken its slots
        over). The caller never waits for it; the keys concerned miss meanwhile."""
        if self._cluster is None or self._closed:
            return
        now = time.monotonic()
        with self._lock:
            if self._refreshing or now < self._next_refresh:
                return
            self._refreshing = True
            self._next_refresh = now + self.config.backoff_s
        threading.Thread(target=self._refresh_slots, name="kvtier-redis-slots", daemon=True).start()

    def _refresh_slots(self) -> None:
        cluster = self._cluster
        try:
            if cluster is None or not self._cluster_breaker.allow():
                return
            # keep the pools of the nodes we know: other threads may be mid-request on them
            cluster.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
        except (RedisClusterException, RedisError, OSError) as e:
            self._cluster_breaker.failed()
            log.warning("kvtier: %s tier: cannot reload the cluster's slot map: %s", self.name, e)
            return
        finally:
            self._refreshing = False
        self._cluster_breaker.succeeded()

    def redis_key(self, key: bytes) -> bytes:
        return self._prefix + bytes(key).hex().encode()

    # -- lookup ----------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return self.lookup([key]) == 1

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the server holds: per node, one script call that counts the
        node's keys present before its first gap (pipelined EXISTS where scripts are refused)."""
        self._check_open()
        if not keys:
            return 0
        rkeys = [self.redis_key(k) for k in keys]
        if self._scripted_lookup:
            present = self._lookup_scripted(rkeys)
            if present is not None:
                return _leading(present)
        replies = self._pipelined(rkeys, lambda i: [("EXISTS", rkeys[i])])
        return _leading([r is not _NO_VALUE and r[0] == 1 for r in replies])  # type: ignore[index]

    def _lookup_scripted(self, rkeys: list[bytes]) -> list[bool] | None:
        """Each key's presence as far as its node's run goes; None: scripts refused, use EXISTS."""
        present = [False] * len(rkeys)
        groups, orphans = self._group(rkeys)
        routes = list(groups.values())

        def script_call(indices: list[int]) -> tuple[Any, ...]:
            return ("EVALSHA", _LOOKUP_SHA, len(indices), *[rkeys[i] for i in indices])

        results = self._exchange([(route, [script_call(ix)]) for route, ix in routes],
                                 [len(ix) for _r, ix in routes], len(orphans))
        for (route, indices), replies in zip(routes, results):
            reply = replies[0] if replies is not None else None
            if isinstance(reply, NoScriptError):  # the first call, or a restarted server: load it once
                again = self._exchange([(route, [("SCRIPT", "LOAD", _LOOKUP_SCRIPT), script_call(indices)])],
                                       [len(indices)])[0]
                reply = again[1] if again is not None else None
            if isinstance(reply, ResponseError):
                if isinstance(reply, (AskError, TryAgainError)):  # MovedError too
                    continue  # this node's keys miss until the slot map is reloaded
                log.info("kvtier: %s tier: %s refuses the lookup script (%s); using EXISTS", self.name, route.name,
                         reply)
                self._scripted_lookup = False
                return None
            if isinstance(reply, int):
                for i in indices[:reply]:
                    present[i] = True
        return present

    def touch(self, keys: Sequence[bytes]) -> None:
        """Server-managed: nothing to do (the server's LRU clock advances on every GET a load
        makes). Owner-managed: the hits (leading keys of one chain, in chain order) are buffered
        as one access record for the owner's policy; no round trip here."""
        if self._access is not None:
            self._access.record_hits(keys)

    # -- read --------------------------------------------------------------------------------
    def read(self, key: bytes, layers: Sequence[int], dests: Sequence[Buffer]) -> ChunkMeta | None:
        return self.read_many([key], layers, [dests])[0]

    def read_many(self, keys: Sequence[bytes], layers: Sequence[int],
                  dests: Sequence[Sequence[Buffer]]) -> list[ChunkMeta | None]:
        """Read chunks in one pipeline per node: GET for all layers, GETRANGE per layer otherwise."""
        views = [check_dests(self, layers, d) for d in dests]
        self._check_open()
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destination lists")
        t0 = time.perf_counter()
        layers = list(layers)
        whole = len(set(layers)) == self.layout.num_layers
        rkeys = [self.redis_key(k) for k in keys]
        lb = self.layer_bytes
        if whole:
            replies = self._pipelined(rkeys, lambda i: [("GET", rkeys[i])])
        else:
            offsets = self._kv_offsets(self._kv_header)

            def ranges(i: int) -> list[tuple[Any, ...]]:
                return [("GETRANGE", rkeys[i], 0, self._kv_header - 1)] + [
                    ("GETRANGE", rkeys[i], offsets[layer], offsets[layer] + lb - 1) for layer in layers]

            replies = self._pipelined(rkeys, ranges)
        out: list[ChunkMeta | None] = []
        hits = 0
        for i, (key, reply) in enumerate(zip(keys, replies)):
            meta = None
            if reply is not _NO_VALUE:
                try:
                    if whole:
                        meta = self._unpack_whole(key, reply[0], layers, views[i])  # type: ignore[index]
                    else:
                        meta = self._unpack_layers(key, rkeys[i], reply, layers, views[i])  # type: ignore[arg-type]
                except _Foreign:
                    self.foreign_chunks += 1
                    self.metrics.inc(m.FOREIGN_CHUNKS, tier=self.name)
                except CorruptChunkError as e:
                    first = reply[0]  # type: ignore[index]
                    size = len(first) if whole and isinstance(first, bytes) else None
                    self._drop_corrupt(rkeys[i], e, [(0, first[:self._kv_header])]
                                       if isinstance(first, bytes) and first else None, size)
            out.append(meta)
            hits += meta is not None
        if hits:
            self.metrics.inc(m.HITS, hits, tier=self.name)
            self.metrics.inc(m.BYTES_READ, hits * len(layers) * lb, tier=self.name)
            self.metrics.inc(m.READ_SECONDS, time.perf_counter() - t0, tier=self.name)
        if hits < len(keys):
            self.metrics.inc(m.MISSES, len(keys) - hits, tier=self.name)
        return out

    def _kv_offsets(self, header_bytes: int) -> list[int]:
        """Where each layer's section starts in a value whose header takes `header_bytes`."""
        from kvtier.core.codec import align_up

        step = align_up(self.layer_bytes)
        return [header_bytes + layer * step for layer in range(self.layout.num_layers)]

    def _header(self, key: bytes, data: Any, value_bytes: int | None) -> tuple[ChunkHeader, list[Section]]:
        """The verified header of `key`'s value and its KV sections by layer."""
        if isinstance(data, ResponseError):
            if str(data).startswith("WRONGTYPE"):  # someone stored another type under this name
                raise CorruptChunkError(f"not a kvtier chunk: {data}")
            raise KeyError(key)  # MOVED/ASK (a slot in migration), NOPERM, ...: a miss, nothing to drop
        if data is None or data == b"":
            raise KeyError(key)
        try:
            header = decode_header(data, value_bytes)
        except NewerFormatError:  # a newer kvtier's (a host upgraded first): a miss, left for it
            raise _Foreign() from None
        if header.layout_id != self._layout_id:
            raise _Foreign()
        if header.key != bytes(key):
            raise CorruptChunkError("key in the header does not match the key's name")
        kv: list[Section | None] = [None] * self.layout.num_layers
        for s in header.sections:
            if s.kind != SECTION_KV:
                continue
            if not 0 <= s.index < len(kv) or kv[s.index] is not None or s.length != self.layer_bytes:
                raise CorruptChunkError(f"bad KV section for layer {s.index}")
            kv[s.index] = s
        if any(s is None for s in kv):
            raise CorruptChunkError("chunk lacks a KV section for some layer")
        return header, kv  # type: ignore[return-value]

    def _unpack_whole(self, key: bytes, value: Any, layers: list[int], views: list[memoryview]) -> ChunkMeta | None:
        try:
            header, kv = self._header(key, value, len(value) if isinstance(value, bytes) else None)
        except KeyError:
            return None
        data = memoryview(value)
        head = [(0, data[:header.header_bytes])]
        for layer, view in zip(layers, views):
            s = kv[layer]
            part = data[s.offset:s.offset + s.length]
            if checksum(part) != s.checksum:
                raise _CorruptValue(f"layer {layer} checksum mismatch", head + [(s.offset, part)], len(value))
            view[:] = part  # one memcpy; the lengths match (checked against the layout above)
        extras = []
        for s in header.sections:
            if s.kind != SECTION_KV:
                part = data[s.offset:s.offset + s.length]
                if checksum(part) != s.checksum:
                    raise _CorruptValue(f"section ({s.kind}, {s.index}) checksum mismatch", head + [(s.offset, part)],
                                        len(value))
                extras.append((s.kind, s.index, bytes(part)))
        return ChunkMeta(header.key, header.parent, header.depth, header.num_tokens,
                         tuple(s.checksum for s in kv), tuple(extras))

    def _unpack_layers(self, key: bytes, rkey: bytes, replies: list[Any], layers: list[int],
                       views: list[memoryview]) -> ChunkMeta | None:
        try:
            raw = self._full_header(rkey, replies[0])
            header, kv = self._header(key, raw, None)
        except KeyError:
            return None
        head = [(0, raw[:header.header_bytes])]
        parts: list[Any] | None = replies[1:]
        if header.header_bytes != self._kv_header:  # extra sections moved the layers: fetch them again
            parts = self._fetch_ranges(rkey, [(kv[layer].offset, kv[layer].length) for layer in layers])
        if parts is None:
            return None
        for layer, view, part in zip(layers, views, parts):
            s = kv[layer]
            if isinstance(part, ResponseError):
                if str(part).startswith("WRONGTYPE"):
                    raise CorruptChunkError(f"not a kvtier chunk: {part}")
                return None  # MOVED, ASK, ...: a miss
            if not part and not self._still_there(rkey):
                return None  # evicted or deleted between this read's round trips (they are not atomic): a miss
            if len(part) != s.length:
                # GETRANGE stops at the value's end: it was exactly this long
                raise _CorruptValue(f"layer {layer}: short value", head + [(s.offset, part)], s.offset + len(part))
            if checksum(part) != s.checksum:
                raise _CorruptValue(f"layer {layer} checksum mismatch", head + [(s.offset, part)])
            view[:] = part
        return ChunkMeta(header.key, header.parent, header.depth, header.num_tokens, tuple(s.checksum for s in kv))

    def _still_there(self, rkey: bytes) -> bool:
        """Whether the value exists (True when the server cannot say): a value cut short is corrupt
        only if it is still there; gone, it was evicted while it was being read."""
        replies = self._pipelined([rkey], lambda _i: [("EXISTS", rkey)])[0]
        return replies is _NO_VALUE or bool(replies[0])  # type: ignore[index]

    def _fetch_ranges(self, rkey: bytes, ranges: Sequence[tuple[int, int]]) -> list[Any] | None:
        """GETRANGE of each (offset, length) of one value; None when the server cannot be asked."""

        replies = self._pipelined(
            [rkey], lambda _i: [("GETRANGE", rkey, offset, offset + length - 1) for offset, length in ranges])[0]
        return None if replies is _NO_VALUE else replies  # type: ignore[return-value]

    def _full_header(self, rkey: bytes, data: Any) -> Any:
        """`data` (the first bytes of a value), extended to the whole header it declares."""
        if isinstance(data, bytes) and len(data) >= 16:
            declared = int.from_bytes(data[12:16], "little")
            if len(data) < declared <= 1 << 24:
                more = self._fetch_ranges(rkey, [(0, declared)])
                if more is None:
                    raise KeyError(rkey)
                return more[0]
        return data

    def read_section(self, key: bytes, kind: int, index: int) -> bytes | None:
        self._check_open()
        rkey = self.redis_key(key)
        reply = self._fetch_ranges(rkey, [(0, self._kv_header)])
        if reply is None:
            return None
        try:
            raw = self._full_header(rkey, reply[0])
            header, _kv = self._header(key, raw, None)
            s = header.section(kind, index)
            if s is None:
                return None
            part = self._fetch_ranges(rkey, [(s.offset, s.length)])
            if part is None or isinstance(part[0], Exception) or len(part[0]) != s.length:
                return None
            if checksum(part[0]) != s.checksum:
                raise _CorruptValue(f"section ({kind}, {index}) checksum mismatch",
                                    [(0, raw[:header.header_bytes]), (s.offset, part[0])])
        except KeyError:
            return None
        except _Foreign:
            self.foreign_chunks += 1
            self.metrics.inc(m.FOREIGN_CHUNKS, tier=self.name)
            return None
        except CorruptChunkError as e:
            first = reply[0]
            self._drop_corrupt(rkey, e, [(0, first)] if isinstance(first, bytes) else None)
            return None
        self.metrics.inc(m.BYTES_READ, s.length, tier=self.name)
        return bytes(part[0])

    def _drop_corrupt(self, rkey: bytes, why: Exception, seen: Sequence[tuple[int, Any]] | None = None,
                      size: int | None = None) -> None:
        """A value failed validation: count it and delete it (best effort), never serve it.

        `seen`: (offset, bytes) pieces of the value as this read saw it (its header, and the
        part that failed its checksum where one did), `size` its length where the read knew
        it; a _CorruptValue carries its own. With them the delete is conditional (one Lua
        script, atomic on the server): the value may have been replaced since (a read's round
        trips are not atomic; another reader dropped it and a host saved the chunk again), and
        a valid copy must stay. Without them, or where the server runs no scripts, a plain DEL."""
        self.metrics.inc(m.CHECKSUM_FAILURES, tier=self.name)
        log.warning("kvtier: %s tier: dropping %s: %s", self.name, rkey.decode(errors="replace"), why)
        if isinstance(why, _CorruptValue):
            seen, size = why.seen, why.size
        pieces = [(off, bytes(b)) for off, b in seen or () if len(b)]
        if pieces:
            args: tuple[Any, ...] = ("EVAL", _DELETE_IF_SAME, 1, rkey, -1 if size is None else int(size))
            for off, b in pieces:
                args += (off, len(b), hashlib.sha1(b, usedforsecurity=False).hexdigest())
            reply = self._pipelined([rkey], lambda _i: [args])[0]
            if reply is _NO_VALUE or not isinstance(reply[0], ResponseError):  # type: ignore[index]
                return
            log.debug("kvtier: %s tier: conditional delete refused (%s); plain DEL", self.name, reply[0])  # type: ignore[index]
        self._pipelined([rkey], lambda _i: [("DEL", rkey)])

    # -- write ---------------------------------------------------------------------------
    def encode(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bytearray:
        """A chunk's value: the codec header, then each section at its 4 KiB-aligned offset."""
        sections, payloads = chunk_sections(meta, layers, self.layout.num_layers, self.layer_bytes)
        raw, header = encode_header(self._layout_id, meta.key, meta.parent, meta.depth, meta.num_tokens, sections)
        value = bytearray(header.file_bytes)
        value[:len(raw)] = raw
        dst = memoryview(value)
        for s, src in zip(header.sections, payloads, strict=True):
            if s.length:
                dst[s.offset:s.offset + s.length] = src
        return value

    def write(self, meta: ChunkMeta, layers: Sequence[Buffer]) -> bool:
        """SET NX the chunk (a key already stored is left as it is); TierWriteError when the server
        cannot take it (unavailable, breaker open, out of memory under a noeviction policy)."""
        self._check_open()
        value = self.encode(meta, layers)
        rkey = self.redis_key(meta.key)
        ttl_ms = int(self.config.ttl_s * 1000) or None
        args: tuple[Any, ...] = ("SET", rkey, memoryview(value), "NX") + (("PX", ttl_ms) if ttl_ms else ())
        if self._access is None:
            reply = self._pipelined([rkey], lambda _i: [args])[0]
        else:
            reply = self._write_with_records(rkey, args)
        if reply is _NO_VALUE:
            raise TierWriteError(f"{self.name}: server unavailable, chunk {meta.key.hex()[:16]} not written")
        result = reply[0]  # type: ignore[index]
        if isinstance(result, Exception):
            raise TierWriteError(f"{self.name}: chunk {meta.key.hex()[:16]} not written: {result}")
        if result:
            self.metrics.inc(m.BYTES_WRITTEN, len(value), tier=self.name)
            if self._access is not None:  # stored by this SET: the owner accounts it (a chunk that was there is not news)
                self._access.record_save(meta.key, meta.parent, meta.depth, len(value))
        return True

    def _write_with_records(self, rkey: bytes, args: tuple[Any, ...]) -> list[Any] | object:
        """The SET of a chunk with the buffered access records (XADDs) in the same exchange: one
        pipeline when the stream lives on the chunk's server, else both nodes in parallel."""
        assert self._access is not None
        if not self._access.send_lock.acquire(blocking=False):  # a flush is sending: its records go first
            return self._pipelined([rkey], lambda _i: [args])[0]
        try:
            return self._write_and_send(rkey, args)
        finally:
            self._access.send_lock.release()

    def _write_and_send(self, rkey: bytes, args: tuple[Any, ...]) -> list[Any] | object:
        assert self._access is not None
        records = self._access.take()
        route = self._route_of(rkey)
        stream_route = self._route_of(self._access.stream) if records else None
        if route is None:
            self._access.give_back(records)
            return _NO_VALUE
        if records and stream_route is route:
            replies = self._exchange([(route, records + [args])], [1])[0]
            self._access.delivered(records, replies[:len(records)] if replies is not None else None)
            return replies[len(records):] if replies is not None else _NO_VALUE
        jobs: list[tuple[_Route, list[tuple[Any, ...]]]] = [(route, [args])]
        if records and stream_route is not None:
            jobs.append((stream_route, records))
        results = self._exchange(jobs, [1, 0][:len(jobs)])
        if records:
            self._access.delivered(records, results[1] if len(results) > 1 else None)
        return results[0] if results[0] is not None else _NO_VALUE

    # -- owner-managed mode (tiers/redis_owner.py) ----------------------------------------------
    def _access_loop(self) -> None:
        """Every flush_s: send this host's access records; the owner replays the stream and evicts.
        A failure is logged and kept in the report (owner_report().last_error); the next period retries."""
        assert self._access is not None
        while not self._stop.wait(self.config.flush_s):
            try:
                self._access.step()
                self._access.report.last_error = ""
            except Exception as e:  # noqa: BLE001 - a daemon loop: log, keep, retry next period
                self._access.report.last_error = f"{type(e).__name__}: {e}"
                self.metrics.inc(m.WRITE_FAILURES, tier=self.name)
                log.exception("kvtier: %s tier: access-stream step failed", self.name)

    def owner_step(self) -> OwnerReport:
        """Run one step of owner-managed mode now (the background thread runs one every flush_s):
        flush this host's records; on the owner, replay the stream, evict, rescan when due."""
        self._check_open()
        if self._access is None:
            raise ValueError(f"{self.name}: not owner-managed (capacity_bytes is 0)")
        self._access.step()
        return self.owner_report()

    def owner_report(self) -> OwnerReport:
        """What owner-managed mode has done (a copy); ValueError for a server-managed tier."""
        if self._access is None:
            raise ValueError(f"{self.name}: not owner-managed (capacity_bytes is 0)")
        return dataclasses.replace(self._access.report)

    def delete(self, key: bytes) -> bool:
        self._check_open()
        rkey = self.redis_key(key)
        reply = self._pipelined([rkey], lambda _i: [("DEL", rkey)])[0]
        if reply is _NO_VALUE:
            raise TierWriteError(f"{self.name}: server unavailable, chunk {bytes(key).hex()[:16]} not deleted")
        return not isinstance(reply[0], Exception) and reply[0] == 1  # type: ignore[index]

    # -- usage / close ---------------------------------------------------------------------
    def usage(self) -> TierUsage:
        """The owner's accounting (this tier's chunk values against capacity_bytes) on the owner of
        an owner-managed tier; otherwise the servers' own figures (all keys, not only kvtier's):
        used memory, maxmemory, keys. Zeros for a server that does not answer."""
        self._check_open()
        if self._access is not None and self._access.view is not None:
            view = self._access.view
            return TierUsage(view.used, self.config.capacity_bytes, len(view.sizes))
        routes = [self._single] if self._single is not None else self._primaries()
        used = cap = chunks = 0
        for route in routes:
            if route is None or not route.breaker.allow():
                continue
            try:
                info = route.client.info("memory")
                keys = route.client.dbsize()
            except _UNAVAILABLE:
                route.breaker.failed()
                continue
            except RedisError:  # it answered, with an error (INFO renamed or forbidden by an ACL)
                route.breaker.succeeded()
                continue
            route.breaker.succeeded()
            used += int(info.get("used_memory", 0))
            cap += int(info.get("maxmemory", 0))
            chunks += int(keys)
        return TierUsage(used, cap, chunks)

    def _primaries(self) -> list[_Route | None]:
        cluster = self._connect_cluster()
        if cluster is None:
            return []
        return [self._route_of_node(cluster, node) for node in cluster.get_primaries()]

    def breaker_open(self) -> bool:
        """Whether any server's breaker is open (requests to it are misses without asking)."""
        routes = [self._single] if self._single is not None else list(self._routes.values())
        return any(r is not None and r.breaker.is_open for r in routes)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.name} tier is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._access_thread is not None and self._access_thread is not threading.current_thread():
            self._access_thread.join()
        if self._access is not None:
            try:
                self._access.flush()  # this host's last records (bounded by the timeouts, skipped while the breaker is open)
                self._access.release()  # a standby owner takes over at its next step
            except (RedisError, OSError) as e:
                log.debug("kvtier: %s tier: last access records not sent: %s", self.name, e)
        self._closed = True
        try:
            if self._single is not None:
                self._single.client.close()
            if self._cluster is not None:
                self._cluster.close()
        except RedisError:
            pass  # closing sockets to a server that is gone


def redis_key_name(namespace: str, layout_id: bytes, key: bytes) -> bytes:
    """The Redis key of chunk `key`: <namespace>:<first 8 bytes of the layout id, hex>:<key hex>."""
    return f"{namespace}:{layout_id[:8].hex()}:".encode() + bytes(key).hex().encode()


def _leading(present: Sequence[bool]) -> int:
    n = 0
    for hit in present:
        if not hit:
            break
        n += 1
    return n


def _url_name(url: str) -> str:
    """The server part of a URL, without credentials, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


__all__ = ["CircuitBreaker", "RedisTier", "redis_key_name"]
