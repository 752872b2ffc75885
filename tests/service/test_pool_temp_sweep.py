"""A service killed between creating its pool under the temporary name and renaming it into
place leaves `.<pool>.<pid>.new` in /dev/shm, as large as the pool: the next start removes it,
and only when it is provably stale (its creator pid is dead and nobody holds its flock)."""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys

from kvtier.core.config import load_config
from kvtier.service.config import ServiceConfig
from kvtier.service.server import StoreServer
from kvtier.service.shm import POOL_PREFIX, SHM_DIR, create_pool, sweep_stale_pools
from tests.service.util import cleanup, service_config, short_tmpdir

# create_pool in a child that dies (SIGKILL) where its rename would be, or stops there until killed
CREATE_THEN = """
import os, signal, sys, time
from kvtier.service import shm
def stop_at_rename(*args):
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    print("created", flush=True)
    time.sleep(120)
os.rename = stop_at_rename
shm.create_pool(sys.argv[1], 1 << 16)
"""


def temp_pool_path(pool: str, pid: int) -> str:
    """create_pool's temporary name, spelled out: leftovers of earlier kvtier versions have it too."""
    folder, base = os.path.split(pool)
    return os.path.join(folder, f".{base}.{pid}.new")


def killed_before_rename(pool: str) -> str:
    """The temporary file a creator of `pool` left when it was killed before its rename."""
    child = subprocess.Popen([sys.executable, "-c", CREATE_THEN, pool, "die"], stderr=subprocess.PIPE, text=True)
    _out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    tmp = temp_pool_path(pool, child.pid)
    assert os.path.exists(tmp)
    return tmp


def test_a_pool_left_under_its_temporary_name_by_a_killed_service_is_swept(tmp_path):
    folder = str(tmp_path)
    tmp = killed_before_rename(os.path.join(folder, POOL_PREFIX + "killed"))
    other = killed_before_rename(os.path.join(folder, "another-program"))  # not a kvtier pool name
    assert sweep_stale_pools(folder) == [tmp]
    assert os.listdir(folder) == [os.path.basename(other)]
    assert sweep_stale_pools(folder) == []


def test_a_live_creators_temporary_pool_is_never_swept(tmp_path):
    folder = str(tmp_path)
    pool = os.path.join(folder, POOL_PREFIX + "starting")
    child = subprocess.Popen([sys.executable, "-c", CREATE_THEN, pool, "stop"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "created"
        tmp = temp_pool_path(pool, child.pid)
        assert sweep_stale_pools(folder) == [] and os.path.exists(tmp)  # alive, holding its flock
    finally:
        child.kill()
        child.wait()
    assert sweep_stale_pools(folder) == [tmp]  # its creator is dead now


def test_a_temporary_pool_is_kept_while_its_pid_lives_or_its_flock_is_held(tmp_path):
    folder = str(tmp_path)
    # a creator between its create and its flock: its pid lives, nobody holds the file yet
    starting = temp_pool_path(os.path.join(folder, POOL_PREFIX + "mine"), os.getpid())
    open(starting, "wb").close()
    # a dead creator's file still held by a descriptor that outlived it (a forked child's)
    held = killed_before_rename(os.path.join(folder, POOL_PREFIX + "held"))
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep_stale_pools(folder) == []
        assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in (starting, held))
    finally:
        os.close(fd)
    assert sweep_stale_pools(folder) == [held]
    assert os.listdir(folder) == [os.path.basename(starting)]


def test_the_next_service_start_sweeps_a_killed_services_temporary_pool():
    folder = short_tmpdir()
    name = POOL_PREFIX + "test-" + secrets.token_hex(6)  # in /dev/shm, as a real service's
    named = "kvtier-test-" + secrets.token_hex(6)  # a configured shm_name: swept by its own next start
    leftovers = [killed_before_rename(os.path.join(SHM_DIR, name)),
                 killed_before_rename(os.path.join(SHM_DIR, named))]
    server = StoreServer(load_config(ServiceConfig, service_config(folder, shm_name=named)))
    try:
        server.start()
        assert [p for p in leftovers if os.path.exists(p)] == []
        assert os.path.exists(server.shm_path)
    finally:
        server.stop()
        for p in leftovers:
            if os.path.exists(p):
                os.unlink(p)
        cleanup(folder)


def test_create_pool_leaves_no_temporary_name(tmp_path):
    pool = os.path.join(str(tmp_path), "kvtier-custom")
    mm, fd = create_pool(pool, 1 << 16)
    try:
        assert os.listdir(str(tmp_path)) == ["kvtier-custom"]
    finally:
        mm.close()
        os.close(fd)
