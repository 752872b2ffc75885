"""A service client under faults (issue 15, section 2): a frozen service, a restarted one,
a failing disk, a frozen client, and keys of the wrong kind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from kvtier.client import connect
from kvtier.core.errors import ConfigError
from kvtier.service import protocol as p
from kvtier.tiers.base import TierWriteError
from tests.conftest import CHUNK, TINY, payload
from tests.service.util import (
    ServiceProcess,
    cleanup,
    exact,
    new_dests,
    save_chain,
    service_config,
    short_tmpdir,
    wait_until,
)


def stop_process(pid: int) -> None:
    """SIGSTOP `pid` and wait until every one of its threads is stopped: kill() only queues the
    signal, and a thread running on another core can still answer a request meanwhile (seen once
    in CI, on a loaded machine)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(1000):
        try:
            states = [open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                      for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # no /proc (or a thread just ended): the signal is what we can do
            return
        if all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)


def chain(client, n: int, start: int = 0, name: str = "faults"):
    root = client.namespace(name).root()
    return root, client.chunk_keys(root, list(range(start, start + n * CHUNK)))


@pytest.fixture
def folder():
    d = short_tmpdir()
    yield d
    cleanup(d)


def test_request_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="request_timeout_s"):
        connect({"mode": "service", "request_timeout_s": 0})


def test_a_frozen_service_is_a_miss_not_a_hang_and_the_client_comes_back(folder):
    svc = ServiceProcess(service_config(folder), folder).start()
    c = svc.client(request_timeout_s=1.0)
    root, keys = chain(c, 3)
    assert save_chain(c, keys, root).wait().in_memory == 3
    assert svc.proc is not None
    thaw = threading.Timer(20.0, lambda: os.kill(svc.proc.pid, signal.SIGCONT))  # old code: blocks until this
    stop_process(svc.proc.pid)
    thaw.start()
    try:
        assert c.lookup(keys, lease=True).hits == 0  # timed out: a miss
        dests = new_dests(3)
        res = c.load(keys, dests).wait()
        assert res.loaded == 0 and res.failed == (0, 1, 2) and res.tiers == ("", "", "")  # recomputed
        layered = c.load_layers(keys, new_dests(3))
        layered.wait_layer(0)
        assert layered.wait().failed == (0, 1, 2)
        root2, fresh = chain(c, 2, start=1000)
        saved = save_chain(c, fresh, root2).wait()
        assert saved.in_memory == 0 and saved.errors and "not saved" in saved.errors[0]
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)
        thaw.cancel()
    try:
        assert wait_until(lambda: c.lookup(keys).hits == 3, timeout=20)  # reconnected
        dests = new_dests(3)
        assert c.load(keys, dests).wait().loaded == 3 and exact(keys, dests)
        assert c.lookup(fresh).hits == 0  # the save that timed out was never published
        stats = c.stats()
        assert stats["host"] == {"leases": 0, "loads": 0, "saves": 0}  # the old connection's holds went back
        assert stats["slots"]["reserved"] == 0 and stats["slots"]["pinned"] == 0
        assert c.reconnects >= 1
        c.close()
    finally:
        svc.stop()


def test_an_existing_client_reconnects_after_the_service_restarts(folder, caplog):
    cfg = service_config(folder, disk=True)
    svc = ServiceProcess(cfg, folder).start()
    c = svc.client()
    root, keys = chain(c, 3)
    save_chain(c, keys, root).wait()
    c.flush()
    first_pid = c.service_pid
    svc.stop()
    # the service is gone: calls degrade instead of raising "Broken pipe", and say so once
    with caplog.at_level("WARNING", logger="kvtier.client"):
        assert c.lookup(keys).hits == 0
    assert "store unavailable" in caplog.text
    assert c.load(keys, new_dests(3)).wait().failed == (0, 1, 2)
    root2, fresh = chain(c, 2, start=500)
    assert save_chain(c, fresh, root2).wait().errors
    svc = ServiceProcess(cfg, folder).start()
    try:
        assert wait_until(lambda: c.lookup(keys).hits == 3, timeout=20)  # back-off retries find the new one
        assert c.service_pid != first_pid and c.reconnects == 1
        dests = new_dests(3)
        assert c.load(keys, dests).wait().loaded == 3 and exact(keys, dests)  # from disk, into the new pool
        assert save_chain(c, fresh, root2).wait().in_memory == 2
        c.close()
    finally:
        svc.stop()


def test_a_service_client_learns_that_its_disk_writes_failed(folder):
    cfg = service_config(folder, disk=True)
    with ServiceProcess(cfg, folder) as svc:
        c = svc.client()
        root, keys = chain(c, 2)
        assert save_chain(c, keys, root).wait().errors == ()
        c.flush()  # all written: nothing to report
        tmp_dir = os.path.join(cfg["store"]["disk"]["root"], "tmp")
        shutil.rmtree(tmp_dir)
        open(tmp_dir, "w").close()  # the disk fails from now on: no temporary file can be made
        root2, failing = chain(c, 2, start=100)
        assert save_chain(c, failing, root2).wait().in_memory == 2  # DRAM took it; disk is in the background
        with pytest.raises(TierWriteError, match="disk write of save"):
            c.flush()
        c.flush()  # reported once

        def later_commit_reports_it() -> bool:
            nonlocal n
            n += 1
            r, more = chain(c, 1, start=1000 + 10 * n * CHUNK)
            return any("disk write of save" in e for e in save_chain(c, more, r).wait().errors)

        n = 0
        assert wait_until(later_commit_reports_it, timeout=10)  # or a later save's errors, without a flush
        c.close()


FROZEN_CLIENT = r"""
import sys
from kvtier.client import connect
from tests.conftest import TINY, payload
c = connect({"mode": "service", "socket_path": sys.argv[1], "lease_timeout_s": float(sys.argv[2])})
root = c.namespace("frozen").root()
keys = c.chunk_keys(root, list(range(3 * c.chunk_tokens)))
s = c.begin_save(keys, root, 0)
s.write_layer(0, [payload(k)[0] for k in keys])
print("reserved", flush=True)
sys.stdin.readline()  # stopped here (SIGSTOP) while the service's hold runs out
for layer in range(1, TINY.num_layers):
    s.write_layer(layer, [payload(k)[layer] for k in keys])
r = s.commit().wait()
print("result", r.in_memory, len(r.errors), flush=True)
sys.stdin.readline()
"""


def test_a_frozen_client_cannot_hold_reserved_slots_past_its_lease_bound(folder):
    with ServiceProcess(service_config(folder), folder) as svc:
        watcher = svc.client()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, svc.socket_path, "2.0"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "reserved"
            os.kill(proc.pid, signal.SIGSTOP)
            assert watcher.stats()["slots"]["reserved"] == 3
            # the client is stopped but connected: its slots go back with the lease bound (2 s)
            assert wait_until(lambda: watcher.stats()["slots"]["reserved"] == 0, timeout=15)
            assert watcher.stats()["host"]["saves"] == 0 and watcher.stats()["clients"] == 2
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = proc.stdout.readline().split()
            assert result[0] == "result" and result[1] == "0" and int(result[2]) == 1  # reported, not published
            root = watcher.namespace("frozen").root()
            keys = watcher.chunk_keys(root, list(range(3 * CHUNK)))
            assert watcher.lookup(keys).hits == 0
            proc.stdin.write("done\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        watcher.close()


def test_keys_depth_and_layer_sources_are_checked_at_the_call(folder):
    with ServiceProcess(service_config(folder), folder) as svc:
        c = svc.client()
        root, keys = chain(c, 2)
        srcs = [payload(k) for k in keys]
        with pytest.raises(ValueError, match=r"keys\[1\] must be a 32-byte key"):
            c.save([keys[0], keys[1] + keys[1]], root, 0, srcs)
        with pytest.raises(ValueError, match=r"keys\[0\] must be a 32-byte key .* got str"):
            c.lookup(["a" * 32])  # type: ignore[list-item]
        with pytest.raises(ValueError, match=r"parent\[0\] must be a 32-byte key"):
            c.save(keys, root[:16], 0, srcs)
        with pytest.raises(ValueError, match="first_depth"):
            c.save(keys, root, -1, srcs)
        with pytest.raises(ValueError, match=r"srcs\[1\] has 1 layer sources; the layout has 2"):
            c.save(keys, root, 0, [srcs[0], srcs[1][:1]])
        with pytest.raises(ValueError, match=r"keys\[0\]"):
            c.load([b"short"], new_dests(1))
        assert c.stats()["slots"]["reserved"] == 0  # nothing leaked
        assert save_chain(c, keys, root).wait().in_memory == 2
        c.close()


def test_the_service_refuses_keys_of_the_wrong_length_or_type(folder):
    import socket

    with ServiceProcess(service_config(folder), folder) as svc:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(svc.socket_path)

        def ask(msg):
            body = msgpack.packb({"id": 1, **msg}, use_bin_type=True)
            s.sendall(struct.pack("<I", len(body)) + body)
            return p.recv_message(s, 5, 5)

        key = b"\x01" * 32
        r = ask({"op": "lookup", "keys": [key, b"\x02" * 64]})
        assert not r["ok"] and r["error"] == "keys[1] has 64 bytes; this store's keys have 32"
        r = ask({"op": "allocate", "keys": [key], "parent": b"\x03" * 16, "first_depth": 0})
        assert not r["ok"] and "field 'parent' has 16 bytes" in r["error"]
        r = ask({"op": "allocate", "keys": ["x" * 32], "parent": key, "first_depth": 0})
        assert not r["ok"] and "keys[0] must be bytes, got str" in r["error"]
        r = ask({"op": "allocate", "keys": [key], "parent": key, "first_depth": -1})
        assert not r["ok"] and "first_depth" in r["error"]
        r = ask({"op": "load_begin", "keys": [key], "hold_s": float("nan")})
        assert not r["ok"] and "hold_s" in r["error"]
        r = ask({"op": "stats"})
        assert r["ok"] and r["stats"]["slots"]["reserved"] == 0
        s.close()


def test_in_process_client_checks_keys_and_layer_sources_too():
    c = connect({"mode": "inprocess", "store": {"chunk_tokens": CHUNK,
                                                "memory": {"capacity_bytes": 2 * TINY.chunk_bytes(CHUNK)}}},
                layout=TINY)
    root, keys = chain(c, 2)
    with pytest.raises(ValueError, match=r"keys\[0\] must be a 32-byte key .* got str"):
        c.save(["k" * 32, keys[1]], root, 0, [payload(k) for k in keys])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"srcs\[0\] has 1 layer sources"):
        c.save(keys, root, 0, [payload(keys[0])[:1], payload(keys[1])])
    assert c.save(keys, root, 0, [payload(k) for k in keys]).wait().in_memory == 2  # no slot leaked
    assert json.dumps(c.stats()["slots"]) and c.stats()["slots"]["reserved"] == 0
    c.close()


def test_trust_margin_before_the_service_hold_ends():
    from kvtier.client.service_client import _trusted_for

    assert _trusted_for(30.0) == 25.0 and _trusted_for(2.0) == 1.0


def test_a_save_written_over_longer_than_its_hold_is_renewed_and_published(folder):
    """Bug: a vLLM step whose forward outlasted the save's hold (an 8k-token prefill on this CPU:
    36 s against 30 s) lost every chunk it saved, silently. The client now renews the slots as
    it writes its layers; here the layers are written over 1.25 times the hold."""
    import time

    with ServiceProcess(service_config(folder), folder) as svc:
        # held 6 s, trusted 3 s, renewed after 1.5 s: a stall of over 1.25 s between two writes
        # would lose the slots (as it should); the writes come every 0.25 s for 7.5 s
        c = svc.client(lease_timeout_s=6.0)
        root, keys = chain(c, 3, start=900)
        session = c.begin_save(keys, root, 0)
        sources = [payload(k) for k in keys]
        started = time.monotonic()
        layer = 0
        while time.monotonic() - started < 7.5:
            session.write_layer(layer % TINY.num_layers, [src[layer % TINY.num_layers] for src in sources])
            layer += 1
            time.sleep(0.25)
        for i in range(TINY.num_layers):
            session.write_layer(i, [src[i] for src in sources])
        res = session.commit().wait()
        assert res.errors == () and res.in_memory == 3
        dests = new_dests(3)
        assert c.load(keys, dests).wait().loaded == 3 and exact(keys, dests)
        assert c.stats()["slots"]["reserved"] == 0
        c.close()


def test_copies_made_after_the_trusted_part_of_a_hold_are_not_used(folder, monkeypatch):
    """A client that finds its pins or slots past their trusted time (it was stalled) fails the
    load and drops the save rather than use slots the service may have handed on."""
    import kvtier.client.service_client as sc

    with ServiceProcess(service_config(folder), folder) as svc:
        c = svc.client()
        root, keys = chain(c, 3)
        save_chain(c, keys, root).wait()
        monkeypatch.setattr(sc, "_trusted_for", lambda hold_s: -1.0)  # every hold already past its trusted part
        assert c.load(keys, new_dests(3)).wait().failed == (0, 1, 2)
        assert c.load_layers(keys, new_dests(3)).wait().failed == (0, 1, 2)
        root2, fresh = chain(c, 2, start=700)
        res = save_chain(c, fresh, root2).wait()
        assert res.in_memory == 0 and "outlived their hold" in res.errors[0]
        monkeypatch.undo()
        assert c.lookup(fresh).hits == 0
        assert c.stats()["slots"]["reserved"] == 0 and c.stats()["slots"]["pinned"] == 0
        dests = new_dests(3)
        assert c.load(keys, dests).wait().loaded == 3 and exact(keys, dests)
        c.close()
