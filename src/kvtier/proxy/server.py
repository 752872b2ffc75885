"""An OpenAI-compatible HTTP proxy for prefill/decode disaggregation through the store.

    kvtier proxy --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8200 --port 8000

Each POST /v1/completions or /v1/chat/completions goes first to the prefill instance (vLLM with
kvtier as "kv_producer") with max_tokens=1, no streaming and kv_transfer_params
{"do_remote_decode": true}: it computes the prompt, kvtier saves its chunks, and the response
carries kv_transfer_params naming them (connectors/vllm/pd.py). The original request then goes
to the decode instance ("kv_consumer") with those parameters: its kvtier waits for the chunks,
loads them and decodes. The decode instance's answer (streamed or not) is passed through as is.

Faults, each answered within a bounded time (prefill_timeout_s for the whole prefill call, then
connect_timeout_s and read_timeout_s for the decode instance's answer):
- a body that is not a JSON object, or has no prompt/messages: 400 with what is wrong;
- the prefill instance down, killed mid-request, failing (5xx) or slower than prefill_timeout_s:
  the request goes to the decode instance without parameters, which computes the prompt itself
  (slower, same tokens); a 4xx from it (the request is bad) is returned to the client as is;
- the decode instance down: 503 naming it; a broken or timed-out answer: 502 / 504;
- the decode instance refused the handoff as made by an instance with another model, KV layout,
  byte format, chunk size or hash mode (its output kv_transfer_params say so, pd.py): 502 naming
  the fields that differ, since the two instances are misconfigured; it computed the answer
  without the foreign KV. Only a non-streamed answer can be checked before it is sent; a
  streamed one is passed through and the decode instance logs the error.

aiohttp (client and server in one well-kept library, streaming both ways) instead of a
hand-written HTTP layer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from kvtier.connectors.vllm.pd import refusal_in
from kvtier.core.config import check_fields, number_field
from kvtier.core.errors import ConfigError

log = logging.getLogger("kvtier.proxy")

ASK_HANDOFF = {"do_remote_decode": True}  # vLLM's name for "keep this for a decode instance"
ROUTES = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}  # path -> the field it needs
# a request body's limit: aiohttp's default (1 MiB) refused prompts of about 150k token ids, the long
# prompts disaggregation is for; 64 MiB holds some 9M
MAX_BODY_BYTES = 64 << 20
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "date",
               "server"}

# a client's request headers the proxy does not pass on: hop-by-hop ones, those aiohttp sets for the
# body it sends (the proxy may rewrite it), and Accept-Encoding (answers are relayed as decoded)
_NOT_FORWARDED = {"host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive",
                  "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate",
                  "accept-encoding", "expect"}
HEALTH_TIMEOUT_S = 5.0  # each instance's /health (and /v1/models) answer, checked side by side

CLIENT_KEY = web.AppKey("client", aiohttp.ClientSession)


def forwarded_headers(request: web.Request) -> dict[str, str]:
    """The client's headers an instance gets with its request (Authorization for a vLLM started
    with --api-key, X-Request-Id, ...): all but the hop-by-hop and body ones."""
    return {name: value for name, value in request.headers.items() if name.lower() not in _NOT_FORWARDED}


def backend_url(value: str, name: str) -> str:
    """An http(s)://host[:port] base URL; ConfigError naming the argument otherwise."""
    try:
        url = URL(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{name}: not a URL: {value!r} ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{name}: expected an http:// or https:// URL with a host, got {value!r}")
    return str(url).rstrip("/")


@dataclass(slots=True, frozen=True)
class ProxyConfig:
    prefill_url: str
    decode_url: str
    connect_timeout_s: float = number_field(5.0, low=0, low_open=True)  # a backend that does not accept
    read_timeout_s: float = number_field(600.0, low=0, low_open=True)  # between two reads of an answer
    # the prefill call as a whole (one token); past it the decode instance computes the prompt itself
    prefill_timeout_s: float = number_field(120.0, low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "proxy")
        object.__setattr__(self, "prefill_url", backend_url(self.prefill_url, "--prefill"))
        object.__setattr__(self, "decode_url", backend_url(self.decode_url, "--decode"))


CONFIG_KEY = web.AppKey("config", ProxyConfig)


def error_response(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body, so clients' SDKs show the message."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill instance gets it: one token, no stream, asking for a handoff."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = dict(ASK_HANDOFF)
    return out


async def _read_request(request: web.Request) -> dict[str, Any] | web.Response:
    field = ROUTES[request.path]
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error_response(400, f"the request body is not valid JSON: {e}", "invalid_request_error")
    except RecursionError:
        return error_response(400, "the request body nests too deeply to parse", "invalid_request_error")
    except LookupError as e:  # Content-Type names a charset Python does not know
        return error_response(400, f"the request's charset is unknown: {e}", "invalid_request_error")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"the request body is over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    if not isinstance(body, dict):
        return error_response(400, f"the request body must be a JSON object, got {type(body).__name__}",
                              "invalid_request_error")
    if field not in body:
        return error_response(400, f"the request has no {field!r} field ({request.path} needs one)",
                              "invalid_request_error")
    if "stream" in body and not isinstance(body["stream"], bool):
        return error_response(400, f"'stream' must be true or false, got {body['stream']!r}", "invalid_request_error")
    return body


async def _prefill(session: aiohttp.ClientSession, cfg: ProxyConfig, path: str,
                   body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any] | web.Response | None:
    """kv_transfer_params from the prefill instance; a Response to return for a 4xx; None when it failed."""
    url = cfg.prefill_url + path
    try:
        async with session.post(url, json=prefill_body(body), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=cfg.prefill_timeout_s,
                                                              sock_connect=cfg.connect_timeout_s)) as resp:
            data = await resp.read()
            if 400 <= resp.status < 500:
                return web.Response(body=data, status=resp.status, content_type=resp.content_type)
            if resp.status >= 500:
                log.warning("kvtier proxy: prefill %s answered %d; the decode instance computes the prompt",
                            url, resp.status)
                return None
            params = json.loads(data).get("kv_transfer_params")
            return params if isinstance(params, dict) else {}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as e:
        log.warning("kvtier proxy: prefill %s failed (%s: %s); the decode instance computes the prompt",
                    url, type(e).__name__, e)
        return None


async def _decode(request: web.Request, session: aiohttp.ClientSession, cfg: ProxyConfig,
                  body: dict[str, Any]) -> web.StreamResponse:
    url = cfg.decode_url + request.path
    try:
        async with session.post(url, json=body, headers=forwarded_headers(request)) as resp:
            if not body.get("stream"):
                return _checked_answer(cfg, resp, await resp.read())
            return await relay_stream(request, resp, url)
    except aiohttp.ClientConnectorError as e:
        return error_response(503, f"the decode instance {cfg.decode_url} is unreachable: {e}", "service_unavailable")
    except asyncio.TimeoutError:
        return error_response(504, f"the decode instance {cfg.decode_url} did not answer within its timeout "
                                   f"(connect {cfg.connect_timeout_s} s, read {cfg.read_timeout_s} s)", "timeout")
    except aiohttp.ClientError as e:
        return error_response(502, f"the decode instance {cfg.decode_url} failed: {type(e).__name__}: {e}",
                              "bad_gateway")


async def relay_stream(request: web.Request, resp: aiohttp.ClientResponse, url: str,
                       headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Stream `resp` to the client as it arrives. Once the headers are sent an upstream failure can
    no longer become an error response (written into the stream, it would corrupt it): the
    connection is cut instead, which clients see as an error."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    for name, value in resp.headers.items():
        if name.lower() not in HOP_HEADERS:
            out.headers[name] = value
    out.headers.update(headers or {})
    await out.prepare(request)
    try:
        async for piece in resp.content.iter_any():
            await out.write(piece)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        log.warning("kvtier proxy: %s broke off mid-answer (%s: %s); the client's stream is cut",
                    url, type(e).__name__, e)
        if request.transport is not None:
            request.transport.abort()
        return out
    await out.write_eof()
    return out


def _checked_answer(cfg: ProxyConfig, resp: aiohttp.ClientResponse, data: bytes) -> web.Response:
    """The decode instance's non-streamed answer as is, unless it refused the handoff as made by an
    instance with another model or layout: then a 502 naming what differs."""
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
    refusal = None
    if resp.status == 200:
        try:
            answer = json.loads(data)
            refusal = refusal_in(answer.get("kv_transfer_params")) if isinstance(answer, dict) else None
        except ValueError:
            pass
    if refusal is not None and refusal[0] == "identity":
        log.error("kvtier proxy: the decode instance %s refused the prefill instance's KV: %s",
                  cfg.decode_url, refusal[1])
        return error_response(502, f"the decode instance {cfg.decode_url} refused the KV of the prefill instance "
                                   f"{cfg.prefill_url}: {refusal[1]}; both must serve the same model with the same "
                                   "KV layout and kvtier settings", "bad_gateway")
    if refusal is not None:
        log.warning("kvtier proxy: the decode instance %s refused the handoff and computed the prompt: %s",
                    cfg.decode_url, refusal[1])
    return web.Response(body=data, status=resp.status, reason=resp.reason, headers=headers)


async def handle_generate(request: web.Request) -> web.StreamResponse:
    body = await _read_request(request)
    if isinstance(body, web.Response):
        return body
    session, cfg = request.app[CLIENT_KEY], request.app[CONFIG_KEY]
    params = await _prefill(session, cfg, request.path, body, forwarded_headers(request))
    if isinstance(params, web.Response):
        return params
    decode = dict(body)
    if params:
        decode["kv_transfer_params"] = params
    else:
        decode.pop("kv_transfer_params", None)  # a client's own parameters are not the producer's
    return await _decode(request, session, cfg, decode)


async def handle_models(request: web.Request) -> web.StreamResponse:
    """/v1/models from the decode instance (both serve the same model)."""
    session, cfg = request.app[CLIENT_KEY], request.app[CONFIG_KEY]
    try:
        async with session.get(cfg.decode_url + "/v1/models", headers=forwarded_headers(request),
                               timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
    except aiohttp.ClientConnectorError as e:
        return error_response(503, f"the decode instance {cfg.decode_url} is unreachable: {e}", "service_unavailable")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return error_response(502, f"the decode instance {cfg.decode_url} failed: {type(e).__name__}: {e}",
                              "bad_gateway")


async def health_of(session: aiohttp.ClientSession, backends: Sequence[tuple[str, str]]) -> web.Response:
    """200 when every backend (its name in messages, its base URL) answers /health, else 503 naming
    those that do not. Asked side by side, each within HEALTH_TIMEOUT_S (a hung instance is
    down, not a /health that hangs with it)."""

    async def check(backend: str, base: str) -> str | None:
        try:
            async with session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
                return None if resp.status == 200 else f"{backend} answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return f"{backend}: {type(e).__name__}"

    down = [d for d in await asyncio.gather(*(check(b, base) for b, base in backends)) if d is not None]
    if down:
        return error_response(503, "; ".join(down), "service_unavailable")
    return web.json_response({"status": "ok"})


async def handle_health(request: web.Request) -> web.Response:
    """200 when both instances answer /health, else 503 naming the one that does not."""
    cfg = request.app[CONFIG_KEY]
    return await health_of(request.app[CLIENT_KEY], [(f"prefill {cfg.prefill_url}", cfg.prefill_url),
                                                      (f"decode {cfg.decode_url}", cfg.decode_url)])


def make_app(cfg: ProxyConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[CONFIG_KEY] = cfg

    async def client_session(app: web.Application):  # type: ignore[no-untyped-def]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            app[CLIENT_KEY] = session
            yield

    app.cleanup_ctx.append(client_session)
    for path in ROUTES:
        app.router.add_post(path, handle_generate)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/health", handle_health)
    return app


def run_proxy(cfg: ProxyConfig, host: str, port: int) -> None:
    log.info("kvtier proxy on %s:%d: prefill %s, decode %s", host, port, cfg.prefill_url, cfg.decode_url)
    # handler_cancellation: a client gone mid-request cancels its upstream call, as it did in tests
    web.run_app(make_app(cfg), host=host, port=port, print=None, handler_cancellation=True)
