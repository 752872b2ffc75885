"""`kvtier serve`: the per-host store service.

One process per host owns the DRAM pool (POSIX shared memory), the TieredStore (indexes,
eviction, background disk writes), leases, and a Prometheus endpoint. Engine processes
talk to it over a Unix socket (protocol.py) and copy payloads straight into and out of
the shared pool.

Threads: one accept loop, one thread per client connection (a client that connects and
never speaks only parks its own thread), a lease reaper, the metrics HTTP server, and a flush
thread once a client flushes (StoreHost.flush). A client's disconnect, clean or by SIGKILL,
returns everything it held (StoreHost.drop_owner).

Stopping: no new connection is taken, every connection's reading side is shut (an idle client's
thread ends at once; a request under way finishes and its reply is still sent), waits in
flush and wait_lower end early, and the threads get one deadline in all (STOP_WAIT_S), not
one each; then the store closes, which writes every committed chunk's pending disk write.

Safety: the socket lives in a private folder (`/tmp/kvtier-<uid>/` by default, shm.py);
a flock on `<socket>.lock` (opened without following links, removed when the service ends)
makes a second service on the same socket refuse to start; a socket file left by a dead
service is replaced. The socket and the pool are 0o600 (0o660 with `group`), every
connection's peer uid is checked (SO_PEERCRED) before anything is sent to it, and the
pool reaches clients as a descriptor attached to the hello reply, never as a path.
SIGTERM flushes pending disk writes and unlinks the socket and the pool; the pool of a service
killed outright (SIGKILL) is removed by the next service start, on any socket (shm.sweep_stale_pools).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from kvtier.core import metrics as m
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError, KVTierError
from kvtier.core.keys import get_hash_mode
from kvtier.service import protocol as p
from kvtier.service.config import ServiceConfig
from kvtier.service.host import StoreHost
from kvtier.service.shm import (
    close_quietly,
    create_pool,
    default_socket_path,
    open_beside,
    prepare_socket_dir,
    shm_path_for,
    sweep_stale_pools,
)
from kvtier.store.tiered import TieredStore

log = logging.getLogger("kvtier.service")

PeerCheck = Callable[[int, int, int], bool]  # (pid, uid, gid) -> allowed?
STOP_WAIT_S = 5.0  # stop(): the longest wait for the service's threads, all of them together


class AlreadyRunningError(KVTierError):
    """Another kvtier serve holds this socket."""


def resolve_group(group: str) -> int | None:
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"service.group {group!r} is not a known group") from None


def same_user_or_group(gid: int | None) -> PeerCheck:
    """The default access rule: the service's own uid, or members of the configured group."""
    me = os.geteuid()

    def allowed(_pid: int, uid: int, peer_gid: int) -> bool:
        if uid == me:
            return True
        if gid is None:
            return False
        if peer_gid == gid:
            return True
        try:
            return pwd.getpwuid(uid).pw_name in grp.getgrgid(gid).gr_mem
        except KeyError:
            return False

    return allowed


def answers(path: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class StoreServer:
    def __init__(self, config: ServiceConfig, *, peer_allowed: PeerCheck | None = None) -> None:
        assert config.layout is not None
        self.config = config
        self.layout = config.layout
        self.socket_path = os.path.abspath(config.socket_path or default_socket_path())
        self.shm_path = shm_path_for(self.socket_path, config.shm_name)
        self.gid = resolve_group(config.group)
        self.key_bytes = get_hash_mode(config.store.hash_mode).key_bytes
        self.lock_path = self.socket_path + ".lock"
        self._peer_allowed = peer_allowed or same_user_or_group(self.gid)
        self.store: TieredStore | None = None
        self.host: StoreHost | None = None
        self.metrics_port: int | None = None
        self.events: Any = None  # a KVEventPublisher when config.events is set
        self._stopping = threading.Event()
        self._conns: dict[int, socket.socket] = {}
        self._conn_threads: dict[int, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._next_owner = 1
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._pool_fd: int | None = None  # holds the pool's flock: the pool is live while it is open
        self._mm: Any = None
        self._ops: dict[str, Callable[[int, dict[str, Any]], dict[str, Any]]] = {
            "hello": self._op_hello, "lookup": self._op_lookup, "lease": self._op_lease,
            "release": self._op_release, "trim": self._op_trim, "renew_leases": self._op_renew_leases,
            "load_begin": self._op_load_begin,
            "load_end": self._op_load_end,
            "allocate": self._op_allocate, "renew": self._op_renew, "commit": self._op_commit,
            "abort": self._op_abort, "flush": self._op_flush, "wait_lower": self._op_wait_lower, "stats": self._op_stats,
        }

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._take_lock()
        try:
            self._start_locked()
        except BaseException:
            self._cleanup()
            raise

    def _take_lock(self) -> None:
        """flock `<socket>.lock`. The file is removed when the service ends (stop, or a failed
        start), so after taking the lock we check that the path still names the file we
        locked: a service that ends between our open and our flock unlinks it, and a third
        one could then create and lock a new file beside ours."""
        prepare_socket_dir(self.socket_path, self.gid)
        for _attempt in range(100):
            fd = open_beside(self.lock_path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise AlreadyRunningError(
                    f"another kvtier serve (pid {pid}) is already running on {self.socket_path}; "
                    "stop it first or choose another socket_path") from None
            try:
                current = os.stat(self.lock_path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = -1
            if current != os.fstat(fd).st_ino:
                os.close(fd)  # unlinked by a service that just ended: lock the new file
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
            return
        raise AlreadyRunningError(f"could not take {self.lock_path}: it keeps being replaced")

    def _start_locked(self) -> None:
        cfg = self.config
        if os.path.lexists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):  # a mistyped path: never deleted
                raise ConfigError(f"socket_path {self.socket_path} names an existing file that is not a socket; "
                                  "choose another path")
            if answers(self.socket_path):  # another user's listener, or a service without our lock
                raise AlreadyRunningError(f"something already answers on {self.socket_path}")
            log.info("replacing stale socket %s left by a dead service", self.socket_path)
            os.unlink(self.socket_path)
        assert cfg.store.memory is not None
        chunk_bytes = self.layout.chunk_bytes(cfg.store.chunk_tokens)
        self.num_slots = cfg.store.memory.capacity_bytes // chunk_bytes
        if self.num_slots <= 0:
            raise ConfigError(f"store.memory.capacity_bytes holds no chunk of {chunk_bytes} bytes")
        self.pool_bytes = self.num_slots * chunk_bytes
        for path in sweep_stale_pools():
            log.info("removed %s, the shared-memory pool of a service that died without stopping", path)
        self._mm, self._pool_fd = create_pool(self.shm_path, self.pool_bytes, self.gid)
        self.store = TieredStore(cfg.store, self.layout, memory_pool=self._mm,
                                 metrics=m.Metrics() if cfg.metrics else m.NullMetrics())
        self.host = StoreHost(self.store, max_lease_s=cfg.max_lease_s)
        self.store.metrics.add_collector(self._service_gauges)
        if cfg.metrics_port:  # before the socket: a port in use fails the start, naming it
            self.metrics_port = self.store.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        if cfg.events is not None:  # the service's tiers' KV events, published once for every client
            from kvtier.events.publisher import KVEventPublisher

            self.events = KVEventPublisher(cfg.events_config())  # a taken port fails the start, naming it
            self.events.attach_store(self.store)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        if self.gid is not None:
            os.chown(self.socket_path, -1, self.gid)
        os.chmod(self.socket_path, 0o660 if self.gid is not None else 0o600)
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self._spawn("kvtier-accept", self._accept_loop)
        self._spawn("kvtier-leases", self._reap_loop)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Stop serving: disconnect clients, flush disk writes, unlink the socket and the pool.

        Waits at most `timeout_s` in all for the accept loop, the reaper and every connection's
        thread (a thread still in a request then, such as a promotion from a stuck disk, is left
        to end on its own: its reply has nowhere to go); the store's close that follows writes
        every committed chunk's pending disk write, however long the disk takes."""
        with self._conns_lock:  # a connection is registered before this, or refused (_accept_loop)
            if self._stopping.is_set():
                return
            self._stopping.set()
            conns = list(self._conns.values())
            threads = list(self._conn_threads.values())
        deadline = time.monotonic() + timeout_s
        for conn in conns:  # recv returns EOF at once; a reply under way can still be sent
            _shutdown_quietly(conn, socket.SHUT_RD)
        if self.host is not None:
            self.host.interrupt_waits()  # flush and wait_lower answer now
        for t in self._threads + threads:
            if t.ident is None:  # accepted just before the stop and not started yet: its connection is shut
                continue
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:  # cut off: a reply stuck in a send to a client that does not read ends too
            with self._conns_lock:
                for conn in self._conns.values():
                    _shutdown_quietly(conn, socket.SHUT_RDWR)
            log.warning("stopping with %d client thread(s) still in a request after %.1f s: %s", len(stuck),
                        timeout_s, ", ".join(stuck[:5]))
        self._cleanup()

    def _cleanup(self) -> None:
        if self.store is not None:
            self.store.metrics.stop_serving()  # first: no scrape starts while the store closes
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self.host is not None:
            self.host.close()
        if self.store is not None:
            self.store.close()  # flushes pending disk writes
        if self.events is not None:
            self.events.flush(1.0)  # what the last disk writes stored, then the sockets close
            self.events.close()
            self.events = None
        if self._mm is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            close_quietly(self._mm)
            self._mm = None
        if self._pool_fd is not None:
            os.close(self._pool_fd)
            self._pool_fd = None
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)  # still ours: we hold its flock (see _take_lock)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- connections -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            with self._conns_lock:  # registered, with its thread, before stop() looks, or refused
                if self._stopping.is_set():
                    conn.close()
                    return
                owner = self._next_owner
                self._next_owner += 1
                full = len(self._conns) >= self.config.max_clients
                if not full:
                    t = threading.Thread(target=self._serve_client, args=(owner, conn),
                                         name=f"kvtier-client-{owner}", daemon=True)
                    self._conns[owner] = conn
                    self._conn_threads[owner] = t
            if full:
                self._refuse(conn, "busy", f"the service already serves {self.config.max_clients} clients")
                continue
            t.start()

    def _refuse(self, conn: socket.socket, kind: str, message: str, drain_s: float = 0.0) -> None:
        """Send one error and close; with `drain_s`, first swallow what the peer already sent,
        so closing does not reset the connection before the peer reads our reply."""
        try:
            conn.settimeout(1.0)
            conn.sendall(p.encode(p.error_reply(0, kind, message)))
            if drain_s:
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(drain_s)
                while conn.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            conn.close()

    def _serve_client(self, owner: int, conn: socket.socket) -> None:
        assert self.host is not None
        try:
            pid, uid, gid = p.peer_credentials(conn)
            if not self._peer_allowed(pid, uid, gid):
                log.warning("refused client pid %d uid %d: not this user or group", pid, uid)
                self._refuse(conn, "permission", f"uid {uid} may not use this kvtier service", drain_s=0.5)
                return
            while not self._stopping.is_set():
                try:
                    msg = p.recv_message(conn, self.config.message_timeout_s)
                except p.ProtocolError as e:
                    self._send(conn, p.error_reply(0, "protocol", str(e)))
                    if e.fatal:
                        return
                    continue
                if msg is None:
                    return
                reply = self._dispatch(owner, msg)
                # the pool goes with the hello reply, as a descriptor: never a path to open
                fds = [self._pool_fd] if msg.get("op") == "hello" and reply["ok"] and self._pool_fd is not None else []
                self._send(conn, reply, fds)
        except OSError:
            pass  # the client went away (or we are stopping): what it held is returned below
        finally:
            with self._conns_lock:
                self._conns.pop(owner, None)
                self._conn_threads.pop(owner, None)
            conn.close()
            self.host.drop_owner(owner)

    def _send(self, conn: socket.socket, reply: dict[str, Any], fds: list[int] | None = None) -> None:
        conn.settimeout(self.config.message_timeout_s)
        p.send_message(conn, reply, fds)

    def _dispatch(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        req_id = msg.get("id", 0)
        op = msg.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return p.error_reply(req_id, "unknown_op", f"unknown message type {op!r}")
        try:
            reply = handler(owner, msg)
        except p.ServiceError as e:
            return p.error_reply(req_id, e.kind, str(e))
        except (KVTierError, ValueError, TypeError) as e:
            return p.error_reply(req_id, "invalid", f"{op}: {e}")
        except Exception as e:  # noqa: BLE001 - one bad request must not take the service down
            log.exception("internal error in %s", op)
            return p.error_reply(req_id, "internal", f"{op}: {type(e).__name__}: {e}")
        reply["id"] = req_id if isinstance(req_id, int) else 0
        reply["ok"] = True
        return reply

    # -- ops ---------------------------------------------------------------------------
    def _op_hello(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None and self.store.memory is not None
        return {
            "version": p.PROTOCOL_VERSION, "pid": os.getpid(), "layout": dataclasses.asdict(self.layout),
            "chunk_tokens": self.store.chunk_tokens, "hash_mode": self.store.config.hash_mode,
            "key_bytes": self.key_bytes, "pool_bytes": self.pool_bytes, "num_slots": self.num_slots,
            "chunk_bytes": self.store.memory.chunk_bytes, "verify_reads": self.store.memory.config.verify_reads,
        }

    def _op_lookup(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        keys = p.get_keys(msg, key_bytes=self.key_bytes)
        lease = msg.get("lease", False)
        if not isinstance(lease, bool):
            raise p.ProtocolError("field 'lease' must be true or false")
        hits, tiers, lease_id = self.host.lookup(owner, keys, lease, p.get_float(msg, "lease_s", 30.0))
        return {"hits": hits, "tiers": tiers, "lease": lease_id}

    def _op_lease(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        return {"lease": self.host.lease(owner, p.get_keys(msg, key_bytes=self.key_bytes),
                                         p.get_float(msg, "lease_s", 30.0))}

    def _op_release(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        lease_id = p.get_int(msg, "lease")
        assert lease_id is not None
        self.host.release(lease_id)
        return {}

    def _op_trim(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        lease_id = p.get_int(msg, "lease")
        assert lease_id is not None
        return {"dropped": self.host.trim(lease_id, p.get_keys(msg, key_bytes=self.key_bytes))}

    def _op_renew_leases(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        return {"renewed": self.host.renew_leases(p.get_ints(msg, "leases"), p.get_float(msg, "lease_s", 30.0))}

    def _op_load_begin(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        wait_s = p.get_float(msg, "wait_s", 0.0) if "wait_s" in msg else None
        pins = self.host.load_begin(owner, p.get_keys(msg, key_bytes=self.key_bytes),
                                    p.get_int(msg, "lease", optional=True), p.get_float(msg, "hold_s", 30.0), wait_s)
        return {"load": pins.load_id, "slots": pins.slots, "tiers": pins.tiers,
                "checksums": [list(c) for c in pins.checksums], "hold_s": pins.hold_s}

    def _op_load_end(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        load_id = p.get_int(msg, "load")
        assert load_id is not None
        self.host.load_end(owner, load_id, p.get_ints(msg, "corrupt"))
        return {}

    def _op_allocate(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        depth = p.get_int(msg, "first_depth")
        assert depth is not None
        if depth < 0:
            raise p.ProtocolError("field 'first_depth' must be >= 0")
        wait_s = p.get_float(msg, "wait_s", 0.0) if "wait_s" in msg else None
        alloc = self.host.allocate(owner, p.get_keys(msg, key_bytes=self.key_bytes),
                                   p.get_bytes(msg, "parent", self.key_bytes), depth, p.get_float(msg, "hold_s", 30.0),
                                   wait_s)
        return {"save": alloc.save_id, "slots": alloc.slots, "granted": alloc.granted, "hold_s": alloc.hold_s}

    def _op_renew(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        save_id = p.get_int(msg, "save")
        assert save_id is not None
        return {"hold_s": self.host.renew_save(owner, save_id, p.get_float(msg, "hold_s", 30.0))}

    def _op_commit(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        save_id = p.get_int(msg, "save")
        assert save_id is not None
        extras = p.get_extras(msg)
        result, _disk_write = self.host.commit(owner, save_id, extras)  # disk write continues in the background
        # failed disk writes of this client's earlier saves, which finished since it last asked
        errors = list(result.errors) + self.host.take_disk_errors(owner)
        return {"chunks": result.chunks, "in_memory": result.in_memory, "on_disk": result.on_disk,
                "errors": errors}

    def _op_abort(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        save_id = p.get_int(msg, "save")
        assert save_id is not None
        self.host.abort(owner, save_id)
        return {}

    def _op_flush(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        """Block this client's connection (its own thread) until the store's disk writes end, at
        most timeout_s: a stuck disk answers "flush_timeout", never a request that hangs."""
        assert self.host is not None
        timeout_s = p.get_float(msg, "timeout_s", p.MAX_FLUSH_S)
        if not 0 <= timeout_s <= p.MAX_FLUSH_S:
            raise p.ProtocolError(f"field 'timeout_s' must be within 0..{p.MAX_FLUSH_S} s, got {timeout_s}")
        self.host.flush(timeout_s)
        # every write of this client was queued before the flush began, so every one has ended
        return {"errors": self.host.take_disk_errors(owner)}

    def _op_wait_lower(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        """Block this client's connection (its own thread) until the keys' lower-tier writes end."""
        assert self.host is not None
        keys = p.get_keys(msg, key_bytes=self.key_bytes)
        timeout_s = p.get_float(msg, "timeout_s", 0.0)
        if not 0 <= timeout_s <= p.MAX_WAIT_LOWER_S:
            raise p.ProtocolError(f"field 'timeout_s' must be within 0..{p.MAX_WAIT_LOWER_S} s, got {timeout_s}")
        return {"pending": self.host.wait_lower(keys, timeout_s)}

    def _op_stats(self, owner: int, msg: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self.stats()}

    def stats(self) -> dict[str, Any]:
        assert self.host is not None
        out = self.host.stats()
        with self._conns_lock:
            out["clients"] = len(self._conns)
        out["pid"] = os.getpid()
        return out

    # -- background --------------------------------------------------------------------
    def _reap_loop(self) -> None:
        assert self.host is not None
        while not self._stopping.wait(0.25):
            try:
                n = self.host.expire()
            except Exception:  # one bad hold must not end every later expiry: logged, tried again
                log.exception("expiring leases failed; trying again")
                continue
            if n:
                log.info("expired %d lease(s)", n)

    def render_metrics(self) -> str:
        """The store's metrics and the service's gauges, in Prometheus's text format."""
        assert self.store is not None
        return self.store.metrics.render_prometheus()

    def _service_gauges(self) -> list[GaugeMetricFamily]:
        """Computed at each scrape. A scrape racing the shutdown gets no service gauges rather
        than an exception: the pool and the host may already be closed."""
        store, host = self.store, self.host
        if store is None or host is None or self._stopping.is_set():
            return []
        try:
            slots = store.memory.slot_counts() if store.memory is not None else {}
            counts = host.counts()
        except (KVTierError, ValueError, OSError) as e:  # closed under us (ValueError: closed mmap)
            log.debug("metrics scrape during shutdown: %s", e)
            return []
        with self._conns_lock:
            clients = len(self._conns)
        gauges = {
            "kvtier_service_clients": (clients, "Connected client processes."),
            "kvtier_service_leases": (counts["leases"], "Leases held."),
            "kvtier_service_free_slots": (slots.get("free", 0), "Free DRAM pool slots."),
            "kvtier_service_pinned_slots": (slots.get("pinned", 0), "DRAM slots pinned by loads or leases."),
        }
        return [GaugeMetricFamily(name, help_text, value=value) for name, (value, help_text) in gauges.items()]


def _shutdown_quietly(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:  # closed already (its thread ended)
        pass


def use_all_cpus() -> set[int]:
    """Let this process run on every CPU the machine (its cpuset) allows; returns the new set.

    A service auto-started by an engine inherits that engine's CPU affinity: vLLM's CPU
    backend pins each worker to its compute cores, and a service confined to those cores
    sometimes waited about a second for CPU time before it even read a lookup. The
    launchers pass --all-cpus; a service started by hand keeps what `taskset` gave it.
    """
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (OSError, AttributeError):  # not Linux, or a cpuset that refuses: keep what we have
        pass
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set()


def serve_main(argv: list[str] | None) -> int:
    """Entry point of `kvtier serve --config FILE [--socket PATH]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="kvtier serve", description="Run the per-host kvtier store service.")
    parser.add_argument("--config", required=True, help="service config file (.yaml, .toml or .json)")
    parser.add_argument("--socket", default=None, help="override socket_path from the config")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    parser.add_argument("--all-cpus", action="store_true",
                        help="run on every CPU allowed, not only those of the launching process (auto-start)")
    args = parser.parse_args(argv)
    if args.all_cpus:
        use_all_cpus()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s kvtier serve[%(process)d] %(levelname)s %(message)s")
    try:
        config = load_config(ServiceConfig, args.config)
        if args.socket:
            config = dataclasses.replace(config, socket_path=args.socket)
        server = StoreServer(config)
        server.start()
    except AlreadyRunningError as e:
        print(f"kvtier serve: {e}", file=sys.stderr)
        return 1
    except (KVTierError, OSError) as e:
        print(f"kvtier serve: cannot start: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    assert server.store is not None
    log.info("listening on %s (pool %s: %d slots of %d bytes%s)%s", server.socket_path, server.shm_path,
             server.num_slots, server.pool_bytes // max(server.num_slots, 1),
             f", disk {config.store.disk.root}" if config.store.disk else "",
             f"; metrics on http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else "")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("stopped: disk writes flushed, socket and shared memory removed")
    return 0
