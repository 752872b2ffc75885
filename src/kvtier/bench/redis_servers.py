"""Throw-away Redis servers and 3-master clusters on loopback, for tests and `kvtier bench fleet`.

Who calls: tests/tiers/test_redis.py and kvtier.bench.redis. Each server is a `redis-server`
child process on 127.0.0.1, on a free port, keeping nothing on disk (`--save "" --appendonly
no`), with its working folder under a caller-given temporary folder. It can be killed, paused
(SIGSTOP), resumed and restarted on the same port, as the fault tests need.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
_rng = random.SystemRandom()  # port draws no seeding elsewhere in the process can repeat


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False, avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """A loopback port nobody listens on (and port + 10000 too, for a cluster node's bus), outside
    `avoid`: the ports (and bus ports) already handed to servers that are not started yet."""
    for _ in range(200):
        port = _rng.randint(20000, 39999)
        mine = {port, port + 10000} if cluster_bus else {port}
        if mine & avoid:
            continue
        if _port_free(port) and (not cluster_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


def _ports_of(servers: list[RedisServer]) -> set[int]:
    """The ports `servers` will listen on, with their cluster bus ports."""
    return {p for s in servers for p in ((s.port, s.port + 10000) if s.cluster else (s.port,))}


class RedisServer:
    """One redis-server child process on 127.0.0.1:<port>."""

    def __init__(self, folder: str | os.PathLike[str], port: int | None = None, *,
                 cluster: bool = False, extra: tuple[str, ...] = (), avoid: frozenset[int] | set[int] = frozenset()) -> None:
        self.cluster = cluster
        self.port = port or free_port(cluster_bus=cluster, avoid=avoid)
        self.folder = Path(folder) / f"redis-{self.port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def args(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.folder), "--protected-mode", "yes"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"]
        return args + list(self.extra)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            if self.cli("PING", check=False).strip() == "PONG":
                # the answer must come from this child: another server that took the port between
                # free_port and now would answer too, and pausing or killing this child would then
                # leave the port serving (a fault test would test nothing)
                pid = self._answering_pid()
                if pid == self.proc.pid:
                    return self
                if pid is not None:
                    self.kill()
                    raise RuntimeError(f"port {self.port} is served by another process (pid {pid}), "
                                       f"not the redis-server started on it")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s} s")

    def _answering_pid(self) -> int | None:
        for line in self.cli("INFO", "server", check=False).splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
        return None

    def log_tail(self) -> str:
        try:
            return (self.folder / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def cli(self, *args: str, check: bool = True) -> str:
        auth: list[str] = []
        if "--requirepass" in self.extra:
            auth = ["-a", self.extra[self.extra.index("--requirepass") + 1], "--no-auth-warning"]
        out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(self.port), *auth, *args],
                             capture_output=True, timeout=10, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {out.stderr.decode(errors='replace')}")
        return out.stdout.decode(errors="replace")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash (its unsaved data is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class RedisClusterServers:
    """A Redis Cluster of `masters` primaries and no replicas, with cluster-require-full-coverage no:
    when one master is lost, the slots of the others keep serving."""

    def __init__(self, folder: str | os.PathLike[str], masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        for _ in range(masters):  # distinct ports: none on another node's port or bus port
            self.nodes.append(RedisServer(folder, cluster=True, avoid=_ports_of(self.nodes)))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addrs = [f"{HOST}:{n.port}" for n in self.nodes]
        out = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                              "--cluster-yes"], capture_output=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout.decode(errors='replace')[-1000:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


__all__ = ["RedisClusterServers", "RedisServer", "free_port", "redis_server_available"]
