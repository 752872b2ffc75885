"""The DRAM pool in POSIX shared memory: a file under /dev/shm mapped by the service and
every client of the same host.

The service creates it owner-only (0o600, or 0o660 with a configured group) and unlinks
it at shutdown; a client maps it read-write to copy payloads in and out of slots.
"""

from __future__ import annotations

import hashlib
import mmap
import os

SHM_DIR = "/dev/shm"


def default_socket_path() -> str:
    """Per-user default socket of `kvtier serve` (no environment lookups)."""
    return f"/tmp/kvtier-{os.geteuid()}.sock"


def shm_path_for(socket_path: str, name: str = "") -> str:
    """The pool file of the service listening on `socket_path` (or named explicitly)."""
    if not name:
        digest = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
        name = f"kvtier-{digest}"
    if "/" in name:
        raise ValueError(f"shared memory name {name!r} must not contain '/'")
    return os.path.join(SHM_DIR, name)


def create_pool(path: str, size: int, gid: int | None = None) -> mmap.mmap:
    """Create (replacing a stale file) and map a pool of `size` bytes, owner-only."""
    try:
        os.unlink(path)  # the caller holds the service lock, so this is a dead server's pool
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o660 if gid is not None else 0o600)
        os.ftruncate(fd, size)
        return _map(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


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
