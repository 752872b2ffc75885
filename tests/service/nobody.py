"""Run small socket-only scripts as a second local user (`runuser -u nobody`), for the tests
that another user cannot hijack the service. They need root; `skip_reason()` says why not."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import threading

PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody cannot read

# Binds a Unix socket (world-connectable), then reports each connection's bytes, one line each.
LISTENER = r"""
import os, socket, sys
path = sys.argv[1]
if len(sys.argv) > 2:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chmod(os.path.dirname(path), int(sys.argv[2], 8))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(3.0)
    got = b""
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += d
    except OSError:
        pass
    print("received", len(got), flush=True)
    c.close()
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a second local user (runuser -u nobody)"
    if shutil.which("runuser") is None:
        return "runuser is not installed"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "there is no user 'nobody'"
    if not os.access(PYTHON, os.X_OK):
        return f"{PYTHON} is missing (the second user's interpreter)"
    return None


def nobody_uid() -> int:
    return pwd.getpwnam("nobody").pw_uid


def run(code: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run `code` (socket and os only) as nobody; its stdout, stderr and exit status."""
    return subprocess.run(["runuser", "-u", "nobody", "--", PYTHON, "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


class Listener:
    """A fake service run by nobody on `path` (creating its folder with `folder_mode` if given);
    `received` lists how many bytes each finished connection sent it."""

    def __init__(self, path: str, folder_mode: str | None = None) -> None:
        args = [path] + ([folder_mode] if folder_mode else [])
        self.proc = subprocess.Popen(["runuser", "-u", "nobody", "--", PYTHON, "-c", LISTENER, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"listener as nobody did not start: {line!r} {err}")
        self.received: list[int] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("received"):
                self.received.append(int(line.split()[1]))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
