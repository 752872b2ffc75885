"""The DRAM pool in POSIX shared memory: a file under /dev/shm mapped by the service and
every client of the same host.

The service creates it owner-only (0o600, or 0o660 with a configured group) and unlinks
it at shutdown; a client maps it read-write to copy payloads in and out of slots.

A service killed with SIGKILL cannot unlink its pool, and /dev/shm is memory: the pool would
hold its size in RAM until a service started again on the same socket. So the service keeps
an flock on its pool for as long as it lives (the kernel drops it with the process), and every
service start sweeps /dev/shm of this user's `kvtier-pool-*` pools that no process holds
(`sweep_stale_pools`). A pool is created under a hidden temporary name, locked, and only then
renamed into place, so a sweep never sees a pool before its owner holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os

SHM_DIR = "/dev/shm"
POOL_PREFIX = "kvtier-pool-"  # pools that hold their flock while served (older kvtier: "kvtier-<hex>", never swept)


def default_socket_path() -> str:
    """Per-user default socket of `kvtier serve` (no environment lookups)."""
    return f"/tmp/kvtier-{os.geteuid()}.sock"


def shm_path_for(socket_path: str, name: str = "") -> str:
    """The pool file of the service listening on `socket_path` (or named explicitly)."""
    if not name:
        digest = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
        name = f"{POOL_PREFIX}{digest}"
    if "/" in name:
        raise ValueError(f"shared memory name {name!r} must not contain '/'")
    return os.path.join(SHM_DIR, name)


def create_pool(path: str, size: int, gid: int | None = None) -> tuple[mmap.mmap, int]:
    """Create (replacing a stale file) and map a pool of `size` bytes, owner-only.

    Returns the mapping and an open descriptor holding the pool's flock: keep it open for as
    long as the pool serves (closing it, or the process dying, marks the pool stale)."""
    folder, base = os.path.split(path)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.new")
    try:
        os.unlink(tmp)  # a leftover of this pid's own earlier attempt
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o660 if gid is not None else 0o600)
        os.ftruncate(fd, size)
        mm = _map(fd, size)
        try:
            os.rename(tmp, path)  # atomically replaces a dead server's pool (the caller holds the service lock)
        except BaseException:
            close_quietly(mm)
            raise
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return mm, fd


def sweep_stale_pools(folder: str = SHM_DIR, prefix: str = POOL_PREFIX) -> list[str]:
    """Unlink this user's pools in `folder` named `prefix`* that no live service holds (their
    owner died without its shutdown, e.g. by SIGKILL). Returns the paths removed.

    A pool is stale when its flock can be taken. Between that test and the unlink a new service
    could rename its pool over the same name; the inode is compared just before unlinking, which
    leaves a window of two system calls (and such a service would be on the dead one's socket)."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    euid = os.geteuid()
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, not ours, or not a plain file
        try:
            st = os.fstat(fd)
            if st.st_uid != euid:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live service holds it
            if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                continue  # replaced meanwhile: not the file we found unlocked
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def open_pool(path: str, size: int) -> mmap.mmap:
    """Map an existing pool (client side)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise ValueError(f"shared memory {path} has {actual} bytes, the service announced {size}")
        return _map(fd, size)
    finally:
        os.close(fd)


def _map(fd: int, size: int) -> mmap.mmap:
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # Huge pages make copies out of the pool markedly faster (fewer TLB misses, most of all
    # in VMs); they apply where /sys/kernel/mm/transparent_hugepage/shmem_enabled allows.
    if size and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return mm


def close_quietly(mm: mmap.mmap) -> None:
    """Unmap unless numpy views still export it (then the mapping goes with the process)."""
    try:
        mm.close()
    except BufferError:
        pass
