"""`kvtier proxy` against tiny fake aiohttp backends (no engine): routing, streaming pass-through, errors."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kvtier.core.errors import ConfigError
from kvtier.proxy import ProxyConfig, make_app

HANDOFF = {"kvtier": {"v": 1, "chunks": 3}}


class FakeInstance:
    """A vLLM-like OpenAI server that records what it was sent."""

    def __init__(self, role: str, status: int = 200, stream_pieces: int = 3, hang_s: float = 0.0,
                 dies: bool = False, refusal: dict[str, Any] | None = None) -> None:
        self.role, self.status, self.stream_pieces, self.hang_s = role, status, stream_pieces, hang_s
        self.dies = dies  # drops the connection mid-request, as a killed instance does
        self.refusal = refusal  # a decode instance's output kv_transfer_params (a refused handoff)
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.path, body))
        if self.dies:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.status != 200:
            return web.json_response({"error": {"message": f"{self.role} says no"}}, status=self.status)
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": HANDOFF})
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.stream_pieces):
                await resp.write(f"data: {json.dumps({'choices': [{'text': f't{i}'}]})}\n\n".encode())
                await asyncio.sleep(0.01)
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [{"text": "decoded"}], "got": body.get("kv_transfer_params"),
                                  "kv_transfer_params": self.refusal})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)  # as vLLM, which takes long prompts
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Scenario = Callable[[TestClient, FakeInstance, FakeInstance], Awaitable[None]]


def run(scenario: Scenario, prefill: FakeInstance | None = None, decode: FakeInstance | None = None,
        decode_down: bool = False, prefill_down: bool = False, read_timeout_s: float = 30.0,
        prefill_timeout_s: float = 30.0) -> None:
    prefill = prefill or FakeInstance("prefill")
    decode = decode or FakeInstance("decode")

    async def main() -> None:
        servers = []
        urls = []
        for inst, down in ((prefill, prefill_down), (decode, decode_down)):
            if down:
                urls.append(f"http://127.0.0.1:{free_port()}")  # nothing listens there
                continue
            server = TestServer(inst.app(), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            urls.append(str(server.make_url("")))
        cfg = ProxyConfig(urls[0], urls[1], connect_timeout_s=2.0, read_timeout_s=read_timeout_s,
                          prefill_timeout_s=prefill_timeout_s)
        async with TestClient(TestServer(make_app(cfg))) as client:
            try:
                await asyncio.wait_for(scenario(client, prefill, decode), timeout=30)
            finally:
                for server in servers:
                    await server.close()

    asyncio.run(main())


def test_completion_goes_to_prefill_with_one_token_then_to_decode_with_its_params() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 20,
                                                           "min_tokens": 5, "stream": False})
        assert resp.status == 200
        assert (await resp.json()) == {"choices": [{"text": "decoded"}], "got": HANDOFF, "kv_transfer_params": None}
        ((path, sent),) = prefill.seen
        assert path == "/v1/completions"
        assert sent == {"model": "m", "prompt": "hi", "max_tokens": 1, "stream": False,
                        "kv_transfer_params": {"do_remote_decode": True}}
        ((_, got),) = decode.seen
        assert got == {"model": "m", "prompt": "hi", "max_tokens": 20, "min_tokens": 5, "stream": False,
                       "kv_transfer_params": HANDOFF}

    run(scenario)


def test_chat_completion_caps_max_completion_tokens_at_prefill() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        ((path, sent),) = prefill.seen
        assert path == "/v1/chat/completions" and sent["max_completion_tokens"] == 1 and sent["max_tokens"] == 1
        ((path, got),) = decode.seen
        assert path == "/v1/chat/completions" and got["max_completion_tokens"] == 9
        assert got["kv_transfer_params"] == HANDOFF

    run(scenario)


def test_streaming_passes_through_piece_by_piece() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi", "stream": True,
                                                           "stream_options": {"include_usage": True}})
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
        assert [line for line in text.split("\n\n") if line] == [
            *(f"data: {json.dumps({'choices': [{'text': f't{i}'}]})}" for i in range(4)), "data: [DONE]"]
        assert "stream_options" not in prefill.seen[0][1] and prefill.seen[0][1]["stream"] is False
        assert decode.seen[0][1]["stream"] is True and decode.seen[0][1]["stream_options"] == {"include_usage": True}

    run(scenario, decode=FakeInstance("decode", stream_pieces=4))


@pytest.mark.parametrize("raw,named", [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"model": "m"}', "no 'prompt' field"),
    (b'{"prompt": "x", "stream": "yes"}', "'stream' must be true or false"),
])
def test_unparsable_request_is_a_400_naming_the_problem(raw: bytes, named: str) -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        assert named in (await resp.json())["error"]["message"]
        assert not prefill.seen and not decode.seen

    run(scenario)


def test_decode_instance_down_is_a_503_naming_it() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 503
        message = (await resp.json())["error"]["message"]
        assert "decode instance" in message and "unreachable" in message
        assert len(prefill.seen) == 1

    run(scenario, decode_down=True)


def test_decode_instance_that_never_answers_is_a_504_within_the_read_timeout() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 504
        assert "did not answer" in (await resp.json())["error"]["message"]

    run(scenario, decode=FakeInstance("decode", hang_s=5.0), read_timeout_s=0.5)


def test_prefill_instance_down_sends_the_request_to_decode_without_params() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi", "kv_transfer_params": {"x": 1}})
        assert resp.status == 200
        assert (await resp.json())["got"] is None  # computed at the decode instance; the client's params dropped

    run(scenario, prefill_down=True)


def test_prefill_instance_killed_mid_request_falls_back_to_decode() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 200 and (await resp.json())["got"] is None
        assert len(prefill.seen) == 1 and len(decode.seen) == 1

    run(scenario, prefill=FakeInstance("prefill", dies=True))


def test_decode_instance_killed_mid_request_is_a_502() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 502 and "decode instance" in (await resp.json())["error"]["message"]

    run(scenario, decode=FakeInstance("decode", dies=True))


def test_prefill_instance_slower_than_its_bound_falls_back_to_decode() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 200 and (await resp.json())["got"] is None
        assert len(prefill.seen) == 1 and len(decode.seen) == 1

    # the prefill call never ends (a hung host); read_timeout_s alone (between reads) would wait 30 s
    run(scenario, prefill=FakeInstance("prefill", hang_s=60.0), prefill_timeout_s=0.5)


def test_decode_refusing_the_handoff_as_another_model_or_layout_is_a_502_naming_the_fields() -> None:
    message = "made for another model or layout: layout '0a' (producer) != '0b' (this instance)"

    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 502
        text = (await resp.json())["error"]["message"]
        assert "refused the KV of the prefill instance" in text and message in text
        assert decode.seen[0][1]["kv_transfer_params"] == HANDOFF  # it was given the producer's handoff

    run(scenario, decode=FakeInstance("decode", refusal={"kvtier_refused": {"kind": "identity", "message": message}}))


def test_decode_refusing_one_prompts_handoff_still_answers() -> None:
    refusal = {"kvtier_refused": {"kind": "prompt", "message": "its last_key is not this prompt's key"}}

    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 200  # it computed the prompt without the handoff: a right answer, slower
        assert (await resp.json())["kv_transfer_params"] == refusal

    run(scenario, decode=FakeInstance("decode", refusal=refusal))


def test_prefill_server_error_falls_back_to_decode_and_client_error_is_returned() -> None:
    async def fallback(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 200 and len(decode.seen) == 1

    run(fallback, prefill=FakeInstance("prefill", status=500))

    async def refused(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        resp = await client.post("/v1/completions", json={"prompt": "hi"})
        assert resp.status == 400 and "prefill says no" in (await resp.json())["error"]["message"]
        assert not decode.seen

    run(refused, prefill=FakeInstance("prefill", status=400))


def test_models_and_health() -> None:
    async def scenario(client: TestClient, prefill: FakeInstance, decode: FakeInstance) -> None:
        assert (await (await client.get("/v1/models")).json()) == {"data": [{"id": "m"}]}
        health = await client.get("/health")
        assert health.status == 503 and "prefill" in (await health.json())["error"]["message"]

    run(scenario, prefill_down=True)


@pytest.mark.parametrize("prefill,decode,named", [
    ("localhost:8000", "http://h:1", "--prefill"),
    ("http://h:1", "ftp://h", "--decode"),
    ("http://h:1", "http://", "--decode"),
])
def test_bad_backend_urls_name_the_argument(prefill: str, decode: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ProxyConfig(prefill, decode)


def test_bad_timeout_names_the_field() -> None:
    with pytest.raises(ConfigError, match="proxy.read_timeout_s"):
        ProxyConfig("http://a:1", "http://b:2", read_timeout_s=0)


def test_a_prompt_past_a_mebibyte_is_proxied_and_bad_bodies_get_json_errors():
    """Bugs: aiohttp's default 1 MiB body limit refused a prompt of 200k token ids (plain text 413),
    and a charset Python does not know was a 500."""
    prompt = list(range(200_000))

    async def scenario(client, prefill, decode):
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 4})
        assert resp.status == 200, (resp.status, (await resp.text())[:200])
        resp = await client.post("/v1/completions", data=json.dumps({"prompt": "hi"}).encode(),
                                 headers={"Content-Type": "application/json; charset=bogus"})
        assert resp.status == 400 and "charset" in (await resp.json())["error"]["message"]
        resp = await client.post("/v1/completions", data=b"[" * ((64 << 20) + 1),
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 413 and "bytes" in (await resp.json())["error"]["message"]

    run(scenario)


class _StallingInstance(FakeInstance):
    """A decode instance whose stream stops after its first piece, past the proxy's read timeout."""

    async def generate(self, request):
        await request.json()
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": {"k": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"t": 0}\n\n')
        await asyncio.sleep(3)
        await resp.write(b"data: [DONE]\n\n")
        return resp


def test_a_stream_broken_mid_answer_is_cut_not_followed_by_a_second_response():
    """Bug: after the stream's headers were sent, an upstream read timeout became an error response
    written into the same connection: a second status line inside the stream, then a terminator
    that looked like a clean end."""
    async def main() -> bytes:
        pre = TestServer(_StallingInstance("prefill").app(), host="127.0.0.1")
        dec = TestServer(_StallingInstance("decode").app(), host="127.0.0.1")
        await pre.start_server()
        await dec.start_server()
        cfg = ProxyConfig(str(pre.make_url("")), str(dec.make_url("")), connect_timeout_s=2.0, read_timeout_s=0.5)
        proxy = TestServer(make_app(cfg), host="127.0.0.1")
        await proxy.start_server()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        raw = b""
        try:
            while piece := await asyncio.wait_for(reader.read(65536), timeout=3):
                raw += piece
        except asyncio.TimeoutError:
            pass
        writer.close()
        for server in (proxy, pre, dec):
            await server.close()
        return raw

    raw = asyncio.run(main())
    assert raw.count(b"HTTP/1.1") == 1 and b'data: {"t": 0}' in raw  # the first piece, then the cut
    assert not raw.endswith(b"0\r\n\r\n")  # no clean chunked end: the client sees the stream broken
