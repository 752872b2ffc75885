"""The proxy, the router and the events as an audit found them:

- the client's headers were dropped, so a vLLM started with --api-key refused every request;
- a deeply nested JSON body was a 500; GET /routing waited for the index on the event loop
  while a resync held it (every request stalled); /health waited 600 s for a hung instance;
- a bad replay endpoint was accepted, then killed the poller for good; a bad events endpoint
  was a traceback;
- a client gone mid-request did not cancel its upstream request under `kvtier proxy`;
- one batch stamped in the future (inf) made the subscriber drop every later one;
- an event dropped on a full queue left a removed block indexed (the gap came after it);
- vLLM's prefix-cache reset also cleared the connector's CPU blocks from the index.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvtier.core.errors import ConfigError
from kvtier.events import BatchCodec, BlockRemoved, BlockStored, EventsConfig, KVEventPublisher
from kvtier.proxy import ProxyConfig, make_app
from kvtier.proxy.routing import RoutingConfig, make_routing_app, parse_instance
from kvtier.router import EventSubscriber, KVIndex

BS = 4
CODEC = BatchCodec("map")


def frames(seq, events, ts=None):
    return [b"", seq.to_bytes(8, "big", signed=True), CODEC.encode(time.time() if ts is None else ts, events)]


def gpu(h, tokens=()):
    return BlockStored([h], None, list(tokens), BS, None, "GPU", None)


class Fake:
    """A fake vLLM instance: records headers and whether the proxy's connection went away."""

    def __init__(self, delay=0.0, need_auth=True):
        self.delay = delay
        self.need_auth = need_auth
        self.auth = []
        self.finished = 0

    async def generate(self, request):
        await request.json()
        self.auth.append(request.headers.get("Authorization"))
        if self.need_auth and request.headers.get("Authorization") != "Bearer secret":
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.finished += 1
        return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": {}})

    def app(self):
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        return app




def test_client_authorization_header_reaches_the_instance(tmp_path):
    """vLLM started with --api-key needs the client's Authorization header; both proxy modes drop it."""
    async def go():
        fake = Fake()
        srv = TestServer(fake.app())
        await srv.start_server()
        url = str(srv.make_url("")).rstrip("/")
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/ev")
        apps = [make_routing_app(RoutingConfig((parse_instance(f"{url}=ipc://{tmp_path}/ev"),), block_size=BS)),
                make_app(ProxyConfig(url, url))]
        statuses = []
        try:
            for app in apps:
                client = TestClient(TestServer(app))
                await client.start_server()
                try:
                    r = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1},
                                          headers={"Authorization": "Bearer secret"})
                    statuses.append(r.status)
                finally:
                    await client.close()
        finally:
            await srv.close()
            pub.close(0)
        assert statuses == [200, 200], f"statuses {statuses}, Authorization the instance saw: {fake.auth}"
    asyncio.run(go())


def test_deeply_nested_json_body_is_a_400_not_a_500(tmp_path):
    async def go():
        client = TestClient(TestServer(make_app(ProxyConfig("http://127.0.0.1:9", "http://127.0.0.1:9"))))
        await client.start_server()
        try:
            r = await client.post("/v1/completions", data=b"[" * 200_000 + b"]" * 200_000,
                                  headers={"Content-Type": "application/json"})
            assert r.status == 400, f"got {r.status}: {(await r.text())[:200]}"
        finally:
            await client.close()
    asyncio.run(go())


def test_get_routing_does_not_freeze_the_event_loop_during_a_resync(tmp_path):
    """Router.stats() takes the index lock with no timeout ON the event loop; the poller thread holds
    it for replay_timeout_ms (2 s) while a gap's resync waits for a replay socket that does not answer."""
    async def go():
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/ev")
        mute = ctx.socket(zmq.ROUTER)  # a replay socket that never answers (a hung instance)
        mute.bind(f"ipc://{tmp_path}/replay")
        fake = Fake()
        srv = TestServer(fake.app())
        await srv.start_server()
        url = str(srv.make_url("")).rstrip("/")
        cfg = RoutingConfig((parse_instance(f"{url}=ipc://{tmp_path}/ev=ipc://{tmp_path}/replay"),), block_size=BS)
        client = TestClient(TestServer(make_routing_app(cfg)))
        await client.start_server()
        try:
            await asyncio.sleep(0.3)
            pub.send_multipart(frames(5, [gpu(1, range(4))]))  # a gap: resync waits 2 s
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            stats = asyncio.create_task(client.get("/routing"))
            await asyncio.sleep(0.05)
            await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1},
                              headers={"Authorization": "Bearer secret"})
            took = time.monotonic() - t0
            r2 = await stats
            print("stats", r2.status, time.monotonic() - t0, await r2.json())
            assert took < 0.5, f"0.05 s of sleep and a plain request took {took:.2f} s: the loop stood behind GET /routing"
        finally:
            await client.close()
            await srv.close()
            pub.close(0)
            mute.close(0)
    asyncio.run(go())


def test_one_batch_stamped_in_the_future_does_not_freeze_the_subscriber(tmp_path):
    """A batch with ts=inf (or NaN first) and a large seq: every later batch, even from a restarted
    publisher, is a 'duplicate' forever."""
    index = KVIndex(BS)
    sub = EventSubscriber(index, "e", f"ipc://{tmp_path}/unused")
    try:
        sub._receive(frames(0, [gpu(1)]), live=True)
        sub._receive(frames(1 << 40, [gpu(2)], ts=math.inf), live=True)  # no replay: view cleared, applied
        for seq in range(0, 5):  # a restarted publisher
            sub._receive(frames(seq, [gpu(100 + seq)]), live=True)
        assert 104 in index.blocks("e", "GPU"), f"all later batches dropped: {sub.stats}"
    finally:
        sub.close()


def test_an_event_dropped_on_a_full_queue_does_not_leave_a_removed_block_indexed(tmp_path, monkeypatch):
    """Stored(X) is queued, Removed(X) is dropped (queue full), and the seq skip lands BEFORE the batch
    that carries Stored(X): the subscriber clears its view, then applies Stored(X). X, removed, stays."""
    gate = threading.Event()
    orig = KVEventPublisher._run

    def gated(self):
        gate.wait(5)
        orig(self)

    monkeypatch.setattr(KVEventPublisher, "_run", gated)
    pub = KVEventPublisher(EventsConfig(f"ipc://{tmp_path}/p", f"ipc://{tmp_path}/r", max_queue_size=1))
    index = KVIndex(16)
    sub = EventSubscriber(index, "e", pub.endpoint, replay=pub.replay_endpoint)
    try:
        time.sleep(0.3)
        pub._put(BlockStored([42], None, [], 16, None, "CPU", None))
        pub._put(BlockRemoved([42], "CPU"))  # dropped: queue full
        assert pub.stats["dropped_queue_full"] == 1
        gate.set()
        assert pub.flush(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sub.stats.unrecovered_gaps == 0:  # the loss, announced at once
            sub.poll(50)
        assert sub.stats.applied >= 1 and sub.stats.unrecovered_gaps == 1
        assert 42 not in index.blocks("e", "CPU"), f"a removed block is still indexed; {sub.stats}"
    finally:
        sub.close()
        pub.close()


def test_vllm_prefix_cache_reset_does_not_forget_blocks_kvtier_still_holds():
    """The routing proxy folds each instance's one stream under source "vllm": vLLM's GPU events AND the
    connector's CPU BlockStored (take_events). vLLM's reset_prefix_cache publishes AllBlocksCleared
    (no medium), which wipes the CPU blocks too, though kvtier's store still holds them."""
    from kvtier.events import AllBlocksCleared, KVEventBatch
    index = KVIndex(BS)
    index.apply("i", "vllm", KVEventBatch(0.0, [BlockStored([7], None, [1, 2, 3, 4], BS, None, "CPU", None)]))
    index.apply("i", "vllm", KVEventBatch(1.0, [AllBlocksCleared()]))
    assert index.blocks("i", "CPU") == {7}


def test_bad_endpoints_are_refused_at_start(tmp_path):
    for value in ("http://h:1=tcp://h", "http://h:1=tcp://h:5557=tcp://replayhost", "http://h:1=tcp://h:notaport"):
        with pytest.raises(ConfigError, match="ZMQ can connect to"):
            parse_instance(value)
    p = subprocess.run([sys.executable, "-m", "kvtier.cli", "proxy", "--port", "18127",
                        "--instance", "http://127.0.0.1:1=tcp://h"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "ZMQ can connect to" in p.stderr


def test_the_poller_survives_a_failed_poll(tmp_path, monkeypatch):
    from kvtier.proxy import routing

    calls = []
    real = routing.Router.poll

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one poll")
        return real(self)

    monkeypatch.setattr(routing.Router, "poll", flaky)

    async def go():
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/ev")
        cfg = RoutingConfig((parse_instance(f"http://127.0.0.1:9=ipc://{tmp_path}/ev"),), block_size=BS,
                            poll_interval_s=0.01)
        client = TestClient(TestServer(make_routing_app(cfg)))
        await client.start_server()
        try:
            deadline = time.monotonic() + 5
            while len(calls) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(calls) >= 3  # the task died at the first exception before
        finally:
            await client.close()
            pub.close(0)

    asyncio.run(go())


def test_health_answers_within_its_timeout_when_an_instance_hangs(tmp_path, monkeypatch):
    from kvtier.proxy import server

    monkeypatch.setattr(server, "HEALTH_TIMEOUT_S", 0.3)

    async def go():
        async def hang(request):
            await asyncio.sleep(30)
            return web.Response()

        async def fine(request):
            return web.Response()

        hung, ok = web.Application(), web.Application()
        hung.router.add_get("/health", hang)
        ok.router.add_get("/health", fine)
        servers = [TestServer(hung), TestServer(ok)]
        for srv in servers:
            await srv.start_server()
        urls = [str(srv.make_url("")).rstrip("/") for srv in servers]
        client = TestClient(TestServer(make_app(ProxyConfig(urls[0], urls[1]))))
        await client.start_server()
        try:
            t0 = time.monotonic()
            r = await asyncio.wait_for(client.get("/health"), 5)  # 600 s before
            assert r.status == 503 and "prefill" in await r.text() and time.monotonic() - t0 < 2
        finally:
            await client.close()
            for srv in servers:
                await srv.close()

    asyncio.run(go())


def test_a_client_gone_mid_request_cancels_the_upstream_call_under_kvtier_proxy(tmp_path):
    """`kvtier proxy` runs web.run_app, whose default (handler_cancellation off) kept the upstream
    call running for nobody; aiohttp's TestServer cancels, so only a real proxy process shows it."""
    async def go():
        state = {"cancelled": False, "finished": False}

        async def slow(request):
            await request.json()
            try:
                await asyncio.sleep(3)
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise
            state["finished"] = True
            return web.json_response({"choices": []})

        upstream = web.Application()
        upstream.router.add_post("/v1/completions", slow)
        srv = TestServer(upstream)
        await srv.start_server()
        url = str(srv.make_url("")).rstrip("/")
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/ev")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "proxy", "--port", str(port),
                                 "--instance", f"{url}=ipc://{tmp_path}/ev"], stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                for _ in range(100):  # until the proxy listens
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/routing") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectorError:
                        await asyncio.sleep(0.1)
                task = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/v1/completions",
                                                        json={"prompt": [1], "max_tokens": 1000}))
                await asyncio.sleep(0.5)
                task.cancel()  # the client goes away
                with pytest.raises(asyncio.CancelledError):
                    await task
            await asyncio.sleep(1.0)
            assert state["cancelled"] and not state["finished"], state
        finally:
            proc.terminate()
            proc.wait(10)
            await srv.close()
            pub.close(0)

    asyncio.run(go())
