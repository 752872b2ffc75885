"""LeaseKeeper: the vLLM scheduler keeps the leases of the loads it planned alive until the worker made them.

Who calls (the scheduler process, EngineCore):

    hold(req_id, lease_id, taken_at)   SchedulerSide.after_alloc: the lease now belongs to a planned load
    renew_due()                        SchedulerSide.build_plan, each step; and the keeper's own thread
    drop(req_id)                       SchedulerSide.request_finished: stop renewing that request's leases
    start() / close()                  KVTierConnector (scheduler role): the thread, from start to shutdown

Why: a lookup's lease lasts lease_s (the connector's lease_timeout_s) from the lookup, but the
worker loads in the step the plan ships in, which may start much later: with async scheduling
vLLM schedules step N+1 while step N runs, so N+1's loads wait for the whole of step N (a long
prefill, a slow CPU), and with pipeline parallelism for several steps. A lease that lapses
meanwhile unpins its chunks, saves (this engine's or another's) may evict them, and the worker's
load misses them: never wrong KV (a load pins and reads chunks by key and checks their
checksums), but vLLM recomputes those blocks and the worker drops every save of that step.
vLLM's scheduler thread waits while a step runs, so a thread renews between steps as well.

Renewals are batched and sparse: nothing is asked until a lease is past half of lease_s since
it was taken or last renewed (a load made within one step costs no call, and a step no more than
a clock read), and then one client call renews every lease past a quarter of it, so calls come at
most about every lease_s / 4. They are bounded: a lease is kept at most max_hold_s after its
lookup; a worker that has not made its load by then is stuck, and the pins go back to the pool.
A lease the store no longer holds (the worker released it after loading, or it lapsed first) is
forgotten, as are a finished request's. A request's later lease (re-admitted after a preemption)
replaces its earlier one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.connectors.vllm.link import StoreLink
from kvtier.core.errors import KVTierError
from kvtier.service.protocol import ServiceError

log = logging.getLogger("kvtier.connectors.vllm")

MAX_HOLD_S = 300.0  # a planned load's lease is kept at most this long after its lookup (the service's max_lease_s)


@dataclass(slots=True)
class _Held:
    lease_id: int
    taken_at: float  # the lookup that took the lease (the keeper's clock)
    renewed_at: float  # the lease lasts lease_s from here


class LeaseKeeper:
    def __init__(self, link: StoreLink, lease_s: float, clock: Callable[[], float] = time.monotonic,
                 max_hold_s: float = MAX_HOLD_S) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        self.link = link
        self.lease_s = lease_s
        self.max_hold_s = max_hold_s
        self.clock = clock
        self.stats = {"lease_renew_calls": 0, "leases_renewed": 0, "leases_given_up": 0, "lease_renew_errors": 0}
        self._held: dict[str, _Held] = {}  # by request: the lease of its planned load
        self._next_due = float("inf")  # no lease needs renewing before then
        self._lock = threading.Lock()  # _held, _next_due
        self._renewing = threading.Lock()  # one renewal at a time: the scheduler's or the thread's
        self._unsupported = False  # the service predates renew_leases: nothing is kept
        self._failing = False  # the last renewal failed (warned once until one succeeds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what ended the thread, raised by the next renew_due

    def hold(self, req_id: str, lease_id: int, taken_at: float) -> None:
        """Keep `lease_id`, taken at `taken_at` for request `req_id`'s planned load, alive."""
        if self._unsupported:
            return
        with self._lock:
            self._held[req_id] = _Held(lease_id, taken_at, taken_at)
            self._next_due = min(self._next_due, taken_at + self.lease_s / 2)

    def drop(self, req_id: str) -> None:
        """Stop renewing the lease of `req_id` (it finished: its load is made, or never will be)."""
        with self._lock:
            self._held.pop(req_id, None)

    def held(self) -> list[int]:
        """The lease ids being kept alive now."""
        with self._lock:
            return [h.lease_id for h in self._held.values()]

    def renew_due(self) -> int:
        """Once a lease is past half its lease_s, renew in one call every lease past a quarter of it;
        returns how many were renewed."""
        if self._error is not None:
            raise RuntimeError("kvtier: the thread renewing the scheduler's leases failed") from self._error
        with self._renewing:
            now = self.clock()
            if now < self._next_due:  # (read unlocked: a hold() racing this is renewed next time)
                return 0
            due = self._due(now)
            client = self.link.current()
            renewed: list[int] = []
            if due and client is not None:  # (else the store is down: its leases went with the connection)
                self.stats["lease_renew_calls"] += 1
                try:
                    renewed = client.renew([lease_id for _, lease_id in due])
                except ServiceError as e:
                    if e.kind != "unknown_op":
                        return self._renew_failed(e)
                    self._give_up_renewing(e)
                    return 0
                except (KVTierError, OSError) as e:
                    return self._renew_failed(e)
            self._failing = False
            kept = set(renewed)
            with self._lock:
                for req_id, lease_id in due:
                    held = self._held.get(req_id)
                    if held is None or held.lease_id != lease_id:
                        continue  # its request finished, or took another lease, meanwhile
                    if lease_id in kept:
                        held.renewed_at = now  # (read before the call: the store's lease ends later)
                    else:
                        del self._held[req_id]  # released by the worker after its load, or lapsed
                oldest = min((h.renewed_at for h in self._held.values()), default=float("inf"))
                self._next_due = oldest + self.lease_s / 2
            self.stats["leases_renewed"] += len(kept)
            return len(kept)

    def _due(self, now: float) -> list[tuple[str, int]]:
        """(request, lease) of every lease past a quarter of its lease_s; those kept max_hold_s
        are given up (warned)."""
        with self._lock:
            stale = [req_id for req_id, h in self._held.items() if now - h.taken_at >= self.max_hold_s]
            for req_id in stale:
                del self._held[req_id]
            due = [(req_id, h.lease_id) for req_id, h in self._held.items() if now - h.renewed_at >= self.lease_s / 4]
        if stale:
            self.stats["leases_given_up"] += len(stale)
            log.warning("kvtier: %d planned load(s) not made %.0f s after their lookup (requests %s): their leases "
                        "are no longer renewed, and a chunk evicted meanwhile is recomputed", len(stale),
                        self.max_hold_s, ", ".join(sorted(stale)))
        return due

    def _renew_failed(self, e: BaseException) -> int:
        """A renewal the store refused or did not answer: the leases are kept, tried again next time."""
        self.stats["lease_renew_errors"] += 1
        if not self._failing:
            log.warning("kvtier: renewing the leases of planned loads failed (%s: %s); trying again next step",
                        type(e).__name__, e)
        self._failing = True
        return 0

    def _give_up_renewing(self, e: ServiceError) -> None:
        self._unsupported = True
        with self._lock:
            self._held.clear()
            self._next_due = float("inf")
        log.warning("kvtier: the kvtier service does not renew leases (%s; an older version?): a load that waits "
                    "longer than lease_timeout_s (%.1f s) may find its chunks evicted and recompute them; restart "
                    "the service with this version of kvtier, or raise lease_timeout_s", e, self.lease_s)

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Renew from a thread too, every lease_s / 4: vLLM's scheduler builds no plan while it
        waits for a step, however long the step runs."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kvtier-lease-renew", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew_due()
            except BaseException as e:  # noqa: BLE001 - raised to the scheduler by its next renew_due
                log.exception("kvtier: the thread renewing the scheduler's leases failed")
                self._error = e
                return

    def close(self) -> None:
        """Stop the thread (the leases still held lapse, or go with the client's connection)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
