"""`kvtier proxy --instance ...`: each request goes to the vLLM instance that holds its prefix.

    kvtier proxy --block-size 16 --port 8000 \\
        --instance http://10.0.0.1:8100=tcp://10.0.0.1:5557 \\
        --instance http://10.0.0.2:8100=tcp://10.0.0.2:5557=tcp://10.0.0.2:5558

(`python -m kvtier.proxy.routing ARGS` is an alias of `kvtier proxy ARGS`; the command line is
parsed once, in kvtier.cli.)

Each `--instance URL=EVENTS[=REPLAY]` names an OpenAI-compatible vLLM instance and the ZMQ
endpoint of its KV events (vLLM's `--kv-events-config`: its own GPU blocks, and through kvtier's
connector `take_events()` the blocks it saved into kvtier), with the replay endpoint if any.
kvtier.router folds them (KVIndex, one EventSubscriber per instance) and CacheAwareRouter picks
the instance for each POST /v1/completions or /v1/chat/completions: the longest cached prefix,
every instance kept within `max_load_share` (1.5) times its fair share of requests. The
prompt's block hashes are those the events named for its tokens (KVIndex.prompt_hashes: events
carry token_ids), so the router needs no copy of vLLM's hash function; a prompt given as text,
or one no event named, scores 0 everywhere and goes to its sticky (or least-loaded) instance.
GET /routing returns the per-instance request counts and the index's counters; GET /health is 200
when every instance answers its /health (else 503 naming those that do not); GET /v1/models is
the first instance's answer (all serve the same model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.core.config import check_fields, number_field
from kvtier.core.errors import ConfigError
from kvtier.proxy.server import (
    HEALTH_TIMEOUT_S,
    MAX_BODY_BYTES,
    ROUTES,
    _read_request,
    backend_url,
    error_response,
    forwarded_headers,
    health_of,
    relay_stream,
)
from kvtier.router import CacheAwareRouter, EventSubscriber, KVIndex

log = logging.getLogger("kvtier.proxy.routing")
INDEX_WAIT_S = 0.02  # the longest a request waits for the index while the poller applies events


@dataclass(slots=True, frozen=True)
class RoutedInstance:
    url: str
    events: str
    replay: str | None = None


@dataclass(slots=True, frozen=True)
class RoutingConfig:
    instances: tuple[RoutedInstance, ...]
    block_size: int = number_field(16, low=1)
    max_load_share: float = number_field(1.5, low=1.0)
    poll_interval_s: float = number_field(0.005, low=0, low_open=True)
    connect_timeout_s: float = number_field(5.0, low=0, low_open=True)
    read_timeout_s: float = number_field(600.0, low=0, low_open=True)
    weights: dict[str, float] = field(default_factory=lambda: {"GPU": 1.0, "CPU": 0.8, "STORAGE": 0.5})

    def __post_init__(self) -> None:
        check_fields(self, "routing")
        if not self.instances:
            raise ConfigError("routing: name at least one --instance URL=EVENTS")
        urls = [backend_url(i.url, "--instance") for i in self.instances]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"routing: instances must be distinct, got {urls}")
        object.__setattr__(self, "instances", tuple(RoutedInstance(u, i.events, i.replay)
                                                      for u, i in zip(urls, self.instances, strict=True)))


def parse_instance(value: str) -> RoutedInstance:
    """URL=EVENTS[=REPLAY]; ConfigError naming what is wrong."""
    parts = value.split("=")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"--instance: expected URL=EVENTS[=REPLAY] (e.g. http://h:8100=tcp://h:5557), got {value!r}")
    for endpoint in parts[1:]:
        if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"--instance {value!r}: {endpoint!r} is not a ZMQ endpoint (tcp://, ipc://)")
        if endpoint.startswith("tcp://*") or endpoint.startswith("tcp://0.0.0.0"):
            raise ConfigError(f"--instance {value!r}: {endpoint!r} is an address to bind (what vLLM's "
                              "--kv-events-config takes); name the host the instance publishes on, e.g. tcp://h:5557")
        _check_connectable(value, endpoint)
    return RoutedInstance(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def _check_connectable(value: str, endpoint: str) -> None:
    """ZMQ's own parse of the endpoint (a throwaway socket's connect: nothing is sent), so a bad
    one is refused here, not met in the poller (the replay socket connects at the first gap)."""
    import zmq

    sock: zmq.Socket = zmq.Context.instance().socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    except zmq.ZMQError as e:
        raise ConfigError(f"--instance {value!r}: {endpoint!r} is not an endpoint ZMQ can connect to: {e}") from None
    finally:
        sock.close()


def prompt_tokens(body: dict[str, Any]) -> list[int]:
    """The prompt's token ids when it is given as ids (a list of ints, or a batch of one); else []."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    return []


class Router:
    """The index, its subscribers and the router. The subscribers are polled on a worker thread (a
    gap's resync waits for the replay socket, up to seconds for an instance that is down: on the
    event loop that stalled every request, stream and /health); the index is read under the same
    lock, and a request that finds it busy for long is routed by load alone (a cache miss at worst)."""

    def __init__(self, cfg: RoutingConfig) -> None:
        self.cfg = cfg
        self.index = KVIndex(cfg.block_size, cfg.weights)
        names = [i.url for i in cfg.instances]
        self.router = CacheAwareRouter(self.index, names, cfg.max_load_share)
        self.subscribers = [EventSubscriber(self.index, i.url, i.events, replay=i.replay, source="vllm")
                            for i in cfg.instances]
        self.routed_hit_blocks = 0
        self.picked_without_index = 0
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Apply what the subscribers have received (the poller's thread)."""
        with self._lock:
            for sub in self.subscribers:
                sub.poll(0)

    def pick(self, tokens: Sequence[int]) -> str:
        if not self._lock.acquire(timeout=INDEX_WAIT_S):
            self.picked_without_index += 1
            return self.router.pick_by_load()
        try:
            hashes = self.index.prompt_hashes(tokens)
            url = self.router.pick(hashes)
            self.routed_hit_blocks += int(self.index.score(url, hashes) > 0)
        finally:
            self._lock.release()
        return url

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        ix = self.index.stats
        return {"requests": dict(self.router.loads), "max_load_share": self.router.max_load_share(),
                "index": {"batches": ix.batches, "stored": ix.stored, "removed": ix.removed,
                          "foreign_block_size": ix.foreign_block_size, "foreign_hash": ix.foreign_hash},
                "subscribers": {s.instance: {"applied": s.stats.applied, "gaps": s.stats.gaps,
                                             "unrecovered_gaps": s.stats.unrecovered_gaps,
                                             "bad_messages": s.stats.bad_messages} for s in self.subscribers},
                "blocks": {i.url: {m: len(self.index.blocks(i.url, m)) for m in self.cfg.weights}
                           for i in self.cfg.instances},
                "requests_sent_to_a_cached_prefix": self.routed_hit_blocks,
                "requests_routed_without_the_index": self.picked_without_index}

    def close(self) -> None:
        with self._lock:  # not while the poller's thread is in a poll (zmq sockets are single-threaded)
            for sub in self.subscribers:
                sub.close()


ROUTER_KEY = web.AppKey("router", Router)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


async def _forward(request: web.Request, base: str, body: dict[str, Any]) -> web.StreamResponse:
    url = base + request.path
    try:
        async with request.app[SESSION_KEY].post(url, json=body, headers=forwarded_headers(request)) as resp:
            return await relay_stream(request, resp, url, {"X-KVTier-Instance": base})
    except aiohttp.ClientConnectorError as e:
        return error_response(503, f"the instance {base} is unreachable: {e}", "service_unavailable")
    except asyncio.TimeoutError:
        return error_response(504, f"the instance {base} did not answer within its timeout", "timeout")
    except aiohttp.ClientError as e:
        return error_response(502, f"the instance {base} failed: {type(e).__name__}: {e}", "bad_gateway")


async def handle_routed(request: web.Request) -> web.StreamResponse:
    body = await _read_request(request)
    if isinstance(body, web.Response):
        return body
    return await _forward(request, request.app[ROUTER_KEY].pick(prompt_tokens(body)), body)


async def handle_routing_stats(request: web.Request) -> web.Response:
    # off the event loop: the poller may hold the index for seconds (a replay socket that is down)
    return web.json_response(await asyncio.to_thread(request.app[ROUTER_KEY].stats))


async def handle_health(request: web.Request) -> web.Response:
    """200 when every instance answers /health, else 503 naming the ones that do not."""
    return await health_of(request.app[SESSION_KEY], [(inst.url, inst.url) for inst in request.app[ROUTER_KEY].cfg.instances])


async def handle_models(request: web.Request) -> web.Response:
    """/v1/models from the first instance that answers."""
    session, cfg = request.app[SESSION_KEY], request.app[ROUTER_KEY].cfg
    failures = []
    for inst in cfg.instances:
        try:
            async with session.get(inst.url + "/v1/models", headers=forwarded_headers(request),
                                   timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            failures.append(f"{inst.url}: {type(e).__name__}")
    return error_response(503, "no instance answered /v1/models: " + "; ".join(failures), "service_unavailable")


def make_routing_app(cfg: RoutingConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        router = Router(cfg)
        app[ROUTER_KEY] = router

        async def keep_polling() -> None:
            while True:
                try:
                    await asyncio.to_thread(router.poll)
                except Exception:  # one bad poll must not freeze the index for good: logged, polled again
                    log.exception("kvtier proxy: applying KV events failed; polling on")
                    await asyncio.sleep(1.0)
                await asyncio.sleep(cfg.poll_interval_s)

        poller = asyncio.create_task(keep_polling())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                app[SESSION_KEY] = session
                yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            router.close()

    app.cleanup_ctx.append(lifecycle)
    for path in ROUTES:
        app.router.add_post(path, handle_routed)
    app.router.add_get("/routing", handle_routing_stats)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/models", handle_models)
    return app


def run_routing_proxy(cfg: RoutingConfig, host: str, port: int) -> None:
    log.info("kvtier proxy on %s:%d: cache-aware routing over %s (block size %d, max load share %.2f)",
             host, port, ", ".join(i.url for i in cfg.instances), cfg.block_size, cfg.max_load_share)
    web.run_app(make_routing_app(cfg), host=host, port=port, print=None, handler_cancellation=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`kvtier proxy` under another name (the routing mode's first entry point)."""
    from kvtier.cli import main as cli_main

    return cli_main(["proxy", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())


