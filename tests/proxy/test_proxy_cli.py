"""`kvtier proxy` from the command line: bad arguments, and a real process answering over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvtier.cli import main

from .test_proxy import free_port

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_bad_backend_url_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["proxy", "--prefill", "localhost:1", "--decode", "http://a:2"]) == 2
    assert "--prefill: expected an http:// or https:// URL" in capsys.readouterr().err


def test_proxy_process_answers_503_naming_the_decode_instance_that_is_down() -> None:
    port, dead = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvtier", "proxy", "--prefill", f"http://127.0.0.1:{dead}",
                             "--decode", f"http://127.0.0.1:{dead}", "--port", str(port), "--connect-timeout", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b'{"prompt": "hi"}',
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=10)
                raise AssertionError("expected an HTTP error")
            except urllib.error.HTTPError as e:
                assert e.code == 503
                assert "decode instance" in json.loads(e.read())["error"]["message"]
                break
            except urllib.error.URLError:  # not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
