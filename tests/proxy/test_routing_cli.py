"""`kvtier proxy --instance ...` (cache-aware routing) from the command line: parsing, good and bad,
and a real proxy process in front of stand-in HTTP instances fed by a stand-in ZMQ event publisher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import zmq

from kvtier.cli import main
from kvtier.events import BatchCodec, BlockStored

SRC = str(Path(__file__).resolve().parents[2] / "src")
BS = 4


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_routing_mode_builds_its_config_from_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.proxy.routing as routing

    seen: dict[str, Any] = {}
    monkeypatch.setattr(routing, "run_routing_proxy", lambda cfg, host, port: seen.update(cfg=cfg, at=(host, port)))
    assert main(["proxy", "--instance", "http://a:1/=tcp://a:2", "--instance", "http://b:1=ipc:///tmp/x=tcp://b:3",
                 "--block-size", "32", "--max-load-share", "1.25", "--port", "9000", "--read-timeout", "7"]) == 0
    cfg = seen["cfg"]
    assert [(i.url, i.events, i.replay) for i in cfg.instances] == [("http://a:1", "tcp://a:2", None),
                                                                    ("http://b:1", "ipc:///tmp/x", "tcp://b:3")]
    assert (cfg.block_size, cfg.max_load_share, cfg.read_timeout_s, cfg.connect_timeout_s) == (32, 1.25, 7.0, 5.0)
    assert seen["at"] == ("127.0.0.1", 9000)
    main(["proxy", "--instance", "http://a:1=tcp://a:2"])  # the defaults
    assert (seen["cfg"].block_size, seen["cfg"].max_load_share) == (16, 1.5)


def test_prefill_decode_mode_keeps_its_arguments_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.proxy as proxy

    seen: dict[str, Any] = {}
    monkeypatch.setattr(proxy, "run_proxy", lambda cfg, host, port: seen.update(cfg=cfg))
    assert main(["proxy", "--prefill", "http://a:1", "--decode", "http://b:2"]) == 0
    assert (seen["cfg"].prefill_url, seen["cfg"].decode_url, seen["cfg"].prefill_timeout_s) == (
        "http://a:1", "http://b:2", 120.0)
    assert main(["proxy", "--prefill", "http://a:1", "--decode", "http://b:2", "--prefill-timeout", "9"]) == 0
    assert seen["cfg"].prefill_timeout_s == 9.0


@pytest.mark.parametrize(("argv", "named"), [
    ([], "--prefill and --decode are required for prefill/decode, or --instance"),
    (["--prefill", "http://a:1"], "--decode is required"),
    (["--prefill", "http://a:1", "--decode", "http://b:2", "--instance", "http://c:3=tcp://c:4"],
     "--prefill, --decode (prefill/decode) and --instance (cache-aware routing) are two modes"),
    (["--instance", "http://c:3=tcp://c:4", "--prefill-timeout", "5"], "--prefill-timeout (prefill/decode) and"),
    (["--block-size", "16"], "--block-size needs --instance"),
    (["--decode", "http://b:2", "--max-load-share", "2"], "are two modes"),
    (["--instance", "http://c:3=tcp://c:4", "--max-load-share", "0.9"], "argument --max-load-share: expected a finite"),
    (["--instance", "http://c:3=tcp://c:4", "--max-load-share", "nan"], "argument --max-load-share"),
    (["--instance", "http://c:3=tcp://c:4", "--block-size", "0"], "argument --block-size: expected a whole number"),
    (["--instance", "http://c:3"], "--instance: expected URL=EVENTS[=REPLAY]"),
    (["--instance", "http://c:3=c:4"], "is not a ZMQ endpoint"),
    (["--instance", "c:3=tcp://c:4"], "--instance: expected an http:// or https:// URL"),
    (["--instance", "http://c:3=tcp://c:4", "--instance", "http://c:3/=tcp://c:5"], "instances must be distinct"),
])
def test_bad_proxy_arguments_are_one_line_and_exit_2(argv: list[str], named: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["proxy", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err


def test_python_m_kvtier_proxy_routing_is_an_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.proxy.routing import main as routing_main

    assert routing_main(["--instance", "http://c:3"]) == 2
    assert "--instance: expected URL=EVENTS" in capsys.readouterr().err


# -- a real proxy process -----------------------------------------------------------------------

class StandIn:
    """An OpenAI-ish instance on a thread: answers /v1/completions with its name, /health with 200."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prompts: list[list[int]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.prompts.append(body["prompt"])
                self._answer({"instance": stand_in.name})

            def do_GET(self) -> None:  # noqa: N802
                self._answer({"status": "ok"} if self.path == "/health" else {"data": [{"id": stand_in.name}]})

            def _answer(self, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[str, list[StandIn], list[zmq.Socket]]]:
    """Two stand-in instances, their event publishers (ipc PUB sockets) and `kvtier proxy --instance`."""
    from .test_proxy import free_port

    ctx = zmq.Context.instance()
    fakes = [StandIn("a"), StandIn("b")]
    pubs, args = [], []
    for i, fake in enumerate(fakes):
        pub = ctx.socket(zmq.PUB)
        pub.bind(f"ipc://{tmp_path}/events{i}")
        pubs.append(pub)
        args += ["--instance", f"{fake.url}=ipc://{tmp_path}/events{i}"]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvtier", "proxy", *args, "--block-size", str(BS),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert get_json(url + "/health") == (200, {"status": "ok"})
                break
            except urllib.error.URLError:  # not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.2)
        yield url, fakes, pubs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for fake in fakes:
            fake.close()
        for pub in pubs:
            pub.close(linger=0)


def test_routing_proxy_process_sends_each_prefix_to_its_holder_within_the_load_cap(routed) -> None:
    url, fakes, pubs = routed
    docs = [list(range(100, 108)), list(range(200, 208))]  # two blocks each
    holder = {0: 1, 1: 0}  # instance b caches document 0, instance a document 1
    seqs = [0, 0]
    deadline = time.monotonic() + 30
    while True:  # PUB/SUB: what is sent before the proxy's subscriber joins is lost, so send until it shows
        for d, inst in holder.items():
            event = BlockStored([1000 * (d + 1) + 1, 1000 * (d + 1) + 2], None, docs[d], BS, None, "GPU", None)
            pubs[inst].send_multipart([b"", seqs[inst].to_bytes(8, "big"),
                                       BatchCodec("map").encode(time.time(), [event])])
            seqs[inst] += 1
        status, stats = get_json(url + "/routing")
        if status == 200 and all(s["applied"] > 0 for s in stats["subscribers"].values()):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)

    # interleaved questions on the two documents: each goes to the instance holding its document
    for q in range(6):
        for d in (0, 1):
            status, answer = get_json(url + "/v1/completions", {"prompt": docs[d] + [300 + q], "max_tokens": 1})
            assert status == 200 and answer["instance"] == "ab"[holder[d]]
    assert [len(f.prompts) for f in fakes] == [6, 6]
    assert all(p[:8] == docs[1] for p in fakes[0].prompts) and all(p[:8] == docs[0] for p in fakes[1].prompts)

    # only document 0 from now on: b holds it, but takes at most 1.5x its fair share; the rest go to a
    picks = [get_json(url + "/v1/completions", {"prompt": docs[0] + [400 + q]})[1]["instance"] for q in range(20)]
    assert picks[0] == "b"
    loads = [len(f.prompts) for f in fakes]
    assert sum(loads) == 32 and loads[1] <= 1.5 * 32 / 2 and loads[0] > 6  # the cap sent some to a
    status, stats = get_json(url + "/routing")
    assert stats["requests"] == {fakes[0].url: loads[0], fakes[1].url: loads[1]}
    assert stats["max_load_share"] <= 1.5
    assert get_json(url + "/v1/models")[1] == {"data": [{"id": "a"}]}
    fakes[1].close()
    status, answer = get_json(url + "/health")
    assert status == 503 and fakes[1].url in answer["error"]["message"] and fakes[0].url not in answer["error"]["message"]


@pytest.mark.parametrize(("argv", "says"), [
    (["proxy", "--port", "70000", "--prefill", "http://a:1", "--decode", "http://b:2"], "1..65535"),
    (["proxy", "--host", "no.such.host.invalid", "--port", "8123", "--prefill", "http://a:1",
      "--decode", "http://b:2"], "cannot listen"),
    (["proxy", "--instance", "http://h:1=tcp://*:5557"], "address to bind"),
])
def test_bad_listen_addresses_and_bind_endpoints_are_one_line_errors(argv, says, capsys) -> None:
    """Bug: these were tracebacks (OverflowError, gaierror, a ZMQError from a wildcard endpoint,
    the form vLLM's --kv-events-config takes) with exit code 1, not the README's one line and 2."""
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
