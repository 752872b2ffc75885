"""StoreLink: one process's connection to the store, which degrades to "no store" on failure.

The scheduler and every worker hold one. `client()` returns the StoreClient, or None while
the store is down: after a failure (`failed(exc)`) the link closes the client and retries
after `retry_after_s`, never blocking a step longer than one connection attempt. A request
then simply gets no external hits and saves nothing: a cache miss, never an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvtier.client.api import StoreClient

log = logging.getLogger("kvtier.connectors.vllm")


class StoreLink:
    def __init__(self, connect: Callable[[bool], StoreClient], retry_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`connect(first)` opens a client (first=True at start, where auto-start may apply)."""
        self._connect = connect
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._client: StoreClient | None = connect(True)
        self._down_since: float | None = None
        self.failures = 0

    def client(self) -> StoreClient | None:
        if self._client is not None:
            return self._client
        if self._down_since is not None and self._clock() - self._down_since < self._retry_after_s:
            return None
        try:
            self._client = self._connect(False)
            log.warning("kvtier: reconnected to the store")
            self._down_since = None
        except Exception as e:  # noqa: BLE001 - still down: stay in fallback, retry later
            log.debug("kvtier: store still unavailable: %s", e)
            self._down_since = self._clock()
        return self._client

    def current(self) -> StoreClient | None:
        """The client if one is open now; never connects (the scheduler's lease renewing thread
        uses it: connecting, and failed(), are the scheduler thread's)."""
        return self._client

    def failed(self, exc: BaseException) -> None:
        """The store failed an operation: drop the client; requests recompute until it is back."""
        self.failures += 1
        if self._client is not None:
            log.warning("kvtier: store unavailable (%s: %s); requests recompute until it is back",
                        type(exc).__name__, exc)
            client, self._client = self._client, None
            try:
                client.close()
            except Exception:  # noqa: BLE001 - already broken; closing is best effort
                pass
        self._down_since = self._clock()

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()
