"""The cache-aware routing proxy against fake instances and fake vLLM event publishers (no engine)."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvtier.core.errors import ConfigError
from kvtier.events import BatchCodec, BlockStored
from kvtier.proxy.routing import RoutingConfig, make_routing_app, parse_instance, prompt_tokens

BS = 4


class Instance:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = 0

    async def generate(self, request: web.Request) -> web.Response:
        await request.json()
        self.seen += 1
        return web.json_response({"instance": self.name})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        return app


def publish(pub: zmq.Socket, seq: int, tokens: list[int], hashes: list[int]) -> None:
    """What vLLM's publisher sends for blocks it cached: BlockStored with token_ids, medium GPU."""
    payload = BatchCodec("map").encode(time.time(), [BlockStored(hashes, None, tokens, BS, None, "GPU", None)])
    pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])


def test_requests_follow_the_cached_prefix_within_the_load_cap(tmp_path) -> None:
    asyncio.run(_follow_the_cache(tmp_path))


async def _follow_the_cache(tmp_path) -> None:
    ctx = zmq.Context.instance()
    pubs = [ctx.socket(zmq.PUB) for _ in range(2)]
    endpoints = [f"ipc://{tmp_path}/ev{i}" for i in range(2)]
    for pub, ep in zip(pubs, endpoints, strict=True):
        pub.bind(ep)
    fakes = [Instance("a"), Instance("b")]
    servers = [TestServer(f.app()) for f in fakes]
    for s in servers:
        await s.start_server()
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    cfg = RoutingConfig(tuple(parse_instance(f"{u}={ep}") for u, ep in zip(urls, endpoints, strict=True)),
                        block_size=BS)
    client = TestClient(TestServer(make_routing_app(cfg)))
    await client.start_server()
    try:
        await asyncio.sleep(0.3)  # the subscribers join
        prompt = list(range(100, 112))  # three blocks
        publish(pubs[1], 0, prompt[:8], [11, 12])  # instance b holds the first two blocks
        for _ in range(100):
            stats = await (await client.get("/routing")).json()
            if stats["index"]["stored"] == 2:
                break
            await asyncio.sleep(0.02)
        answers = []
        for _ in range(10):
            resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            assert resp.status == 200
            answers.append((await resp.json())["instance"])
        assert answers[0] == "b"  # the cached prefix wins
        assert answers.count("b") <= 1.5 * 10 / 2  # and b stays within 1.5x its fair share
        assert answers.count("b") == max(answers.count(x) for x in "ab")
        resp = await client.post("/v1/completions", json={"prompt": "text, not ids", "max_tokens": 1})
        assert resp.status == 200  # routed (score 0 everywhere), not refused
        stats = await (await client.get("/routing")).json()
        assert sum(stats["requests"].values()) == 11 and stats["max_load_share"] <= 1.5
        assert stats["requests_sent_to_a_cached_prefix"] >= 1
        resp = await client.post("/v1/completions", data=b"not json")
        assert resp.status == 400
    finally:
        await client.close()
        for s in servers:
            await s.close()
        for pub in pubs:
            pub.close(linger=0)


def test_bad_instances_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="URL=EVENTS"):
        parse_instance("http://h:1")
    with pytest.raises(ConfigError, match="not a ZMQ endpoint"):
        parse_instance("http://h:1=h:5557")
    with pytest.raises(ConfigError, match="distinct"):
        RoutingConfig((parse_instance("http://h:1=tcp://h:2"), parse_instance("http://h:1=tcp://h:3")))
    with pytest.raises(ConfigError, match="at least one"):
        RoutingConfig(())
    assert prompt_tokens({"prompt": [[1, 2]]}) == [1, 2] and prompt_tokens({"prompt": "hi"}) == []


def test_a_gap_whose_replay_never_answers_does_not_stall_the_proxy(tmp_path) -> None:
    """Bug: the subscribers were polled on the event loop, and a gap's resync waits (2 s) for the
    replay socket: an instance whose replay endpoint is down froze every request meanwhile. They are
    polled on a worker thread now; a request routes by load while the index is busy."""
    asyncio.run(_stall_free(tmp_path))


async def _stall_free(tmp_path) -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    endpoint = f"ipc://{tmp_path}/ev"
    pub.bind(endpoint)
    fake = Instance("a")
    server = TestServer(fake.app())
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    cfg = RoutingConfig((parse_instance(f"{url}={endpoint}=ipc://{tmp_path}/nobody"),), block_size=BS)
    client = TestClient(TestServer(make_routing_app(cfg)))
    await client.start_server()
    try:
        await asyncio.sleep(0.3)  # the subscriber joins
        started = time.monotonic()
        publish(pub, 5, list(range(8)), [1, 2])  # batches 0..4 never seen: a gap, and no replay answers
        await asyncio.sleep(0.2)  # the poller is in its resync now (2 s)
        for _ in range(10):
            resp = await client.post("/v1/completions", json={"prompt": list(range(8)), "max_tokens": 1})
            assert resp.status == 200
        took = time.monotonic() - started
        assert took < 1.0, f"the loop stood still behind the resync: {took:.2f} s for 0.2 s of sleep and 10 requests"
        for _ in range(200):
            stats = await (await client.get("/routing")).json()
            if stats["subscribers"][url]["unrecovered_gaps"]:
                break
            await asyncio.sleep(0.02)
        assert stats["subscribers"][url]["unrecovered_gaps"] == 1
    finally:
        await client.close()
        await server.close()
        pub.close(linger=0)
