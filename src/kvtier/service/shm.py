"""Where the service lives on the filesystem: its private socket folder, the files beside
its socket, and the DRAM pool in POSIX shared memory.

Socket folder: every default socket lives in `/tmp/kvtier-<uid>/` (one folder per user,
named from the uid alone; `default_socket_path`), created 0o700, or 0o750 and owned by the
configured group. A folder already there with another owner, another group or wider
permissions is refused (it could have been planted by another local user to capture the
clients). Files kvtier creates beside the socket (`<socket>.lock`, `<socket>.log`, the vLLM
connector's `<socket>.service.json`) are opened with O_NOFOLLOW (`open_beside`), so a symlink
planted there is never followed, and must be regular files owned by this user.

Pool: the service creates it owner-only (0o600, or 0o660 with a configured group), unlinks
it at shutdown, and hands it to each client as a file descriptor over the socket
(SCM_RIGHTS): a client never opens a pool by path, so a server cannot point it at another
file; the client checks the descriptor's owner and size before mapping it (`map_pool_fd`).

A service killed with SIGKILL cannot unlink its pool, and /dev/shm is memory: the pool would
hold its size in RAM until a service started again on the same socket. So the service keeps
an flock on its pool for as long as it lives (the kernel drops it with the process), and every
service start sweeps /dev/shm of this user's `kvtier-pool-*` pools that no process holds
(`sweep_stale_pools`). A pool is created under a hidden temporary name, locked, and only then
renamed into place, so a sweep never sees a pool before its owner holds it.

A service killed between creating that temporary file (`.<pool name>.<pid>.new`) and renaming
it leaves it behind, as large as the pool. The sweep removes such a file only when it is provably
stale: nobody holds its flock and the pid in its name is not a live process. A creator that is
still between its create and its flock is alive, so its file stays; a pid reused since by
another process keeps a dead service's file until that process ends (a leak, never a loss).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import stat
from collections.abc import Callable

from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout

SHM_DIR = "/dev/shm"
POOL_PREFIX = "kvtier-pool-"  # pools that hold their flock while served (older kvtier: "kvtier-<hex>", never swept)
SOCKET_BASE = "/tmp"  # parent of the per-user folders (tests point it elsewhere)
_PRIVATE_NAME = re.compile(r"kvtier-\d+")
_TEMP_SUFFIX = ".new"
_TEMP_NAME = re.compile(r"\.(?P<pool>.+)\.(?P<pid>[0-9]{1,10})" + re.escape(_TEMP_SUFFIX))  # temp_pool_path


def private_dir(uid: int | None = None) -> str:
    """The per-user socket folder, `/tmp/kvtier-<uid>` (named from the uid alone)."""
    return os.path.join(SOCKET_BASE, f"kvtier-{os.geteuid() if uid is None else uid}")


def default_socket_path(layout: KVLayout | None = None, chunk_tokens: int | None = None) -> str:
    """The default socket of `kvtier serve` (no environment lookups): `/tmp/kvtier-<uid>/kvtier.sock`,
    or with a layout (the vLLM connector: one service per KV layout and chunk size, so models
    of different shapes never meet on one socket) `/tmp/kvtier-<uid>/vllm-<layout id>.sock`."""
    folder = private_dir()
    if layout is None:
        return os.path.join(folder, "kvtier.sock")
    if chunk_tokens is None:
        raise ValueError("default_socket_path(layout, chunk_tokens): a layout needs its chunk_tokens")
    return os.path.join(folder, f"vllm-{layout.layout_id(chunk_tokens)[:6].hex()}.sock")


def is_private_dir(folder: str) -> bool:
    """Whether `folder` is this user's socket folder (`<SOCKET_BASE>/kvtier-<uid>`), checked strictly."""
    return folder == private_dir()


def _named_uid(folder: str) -> int | None:
    """The uid in another user's socket folder name (`<SOCKET_BASE>/kvtier-<uid>`), else None."""
    name = os.path.basename(folder)
    if os.path.dirname(folder) != SOCKET_BASE or _PRIVATE_NAME.fullmatch(name) is None:
        return None
    return int(name.split("-", 1)[1])


def prepare_socket_dir(socket_path: str, gid: int | None = None) -> str:
    """Create (if needed) and check the folder of `socket_path`; returns the folder.

    The per-user folder is made 0o700 (0o750, group `gid`, with a group); one that exists
    owned by someone else, not a plain folder, or open wider than that is a ConfigError naming
    it and socket_path. Any other folder (a configured socket_path) must not be writable by
    other users unless it is sticky like /tmp (they could replace the socket or plant links)."""
    folder = os.path.dirname(os.path.abspath(socket_path))
    if is_private_dir(folder):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        check_private_dir(folder, socket_path, gid)
        if gid is not None:  # ours and no wider than 0o750: open it to the group (it may be 0o700 from before)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, -1, gid)
                os.fchmod(fd, 0o750)
            finally:
                os.close(fd)
        return folder
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.stat(folder)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"socket_path {socket_path}: its folder {folder} is writable by other users "
                          f"(mode {stat.S_IMODE(st.st_mode):o}); use a folder only you can write to")
    return folder


def check_private_dir(folder: str, socket_path: str, gid: int | None = None) -> None:
    """Refuse a per-user socket folder that another user could have planted or can write to."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    allowed = 0o750 if gid is not None else 0o700
    problem = ""
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder (a symlink or a file)"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not this user ({os.geteuid()})"
    elif mode & ~allowed:
        problem = f"has mode {mode:o}, wider than {allowed:o}"
    elif gid is not None and mode & 0o070 and st.st_gid != gid:
        problem = f"belongs to group {st.st_gid}, not the configured group {gid}"
    if problem:
        raise ConfigError(f"socket_path {socket_path}: the private folder {folder} {problem}; another user may "
                          "have created it to capture kvtier's clients. Remove it, or set socket_path elsewhere")


def trusted_server_uids(socket_path: str) -> frozenset[int]:
    """Uids a client accepts as the service on `socket_path` (checked with SO_PEERCRED):
    itself, root, and the owner of the socket's folder when no one else can write there
    (a service shared with a group runs as the folder's owner)."""
    folder = os.path.dirname(os.path.abspath(socket_path))
    uids = {os.geteuid(), 0}
    if is_private_dir(folder):
        check_private_dir(folder, socket_path, _folder_gid_if_grouped(folder))
        return frozenset(uids)
    named = _named_uid(folder)  # another user's folder, shared with a group: it must really be theirs
    try:
        st = os.lstat(folder)
    except OSError:
        return frozenset(uids)
    if named is not None:
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != named or st.st_mode & 0o022:
            raise ConfigError(f"socket_path {socket_path}: the folder {folder} is not uid {named}'s private folder "
                              f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); another user may have "
                              "created it to capture kvtier's clients")
        uids.add(named)
    elif stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022:
        uids.add(st.st_uid)
    return frozenset(uids)


def _folder_gid_if_grouped(folder: str) -> int | None:
    try:
        st = os.lstat(folder)
    except OSError:
        return None
    return st.st_gid if st.st_mode & 0o070 else None


def open_beside(path: str, flags: int, mode: int = 0o600) -> int:
    """Open a file kvtier keeps beside its socket without following a symlink planted there.

    O_NOFOLLOW refuses a symlink at `path`; what is opened must be a regular file owned by this
    user (with O_CREAT|O_EXCL it is new, so it is). Returns the descriptor (close-on-exec)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        # ELOOP: a symlink; EACCES also, where fs.protected_regular refuses O_CREAT on another
        # user's entry in a sticky folder before O_NOFOLLOW is looked at
        if e.errno in (errno.ELOOP, errno.EACCES, errno.EPERM) and os.path.islink(path):
            raise ConfigError(f"{path} is a symlink; kvtier does not follow links beside its socket "
                              "(another user may have planted it): remove it") from None
        if e.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path):
            raise ConfigError(f"{path} is not this user's file ({e.strerror}); another user may have "
                              "planted it: remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"{path} is not a regular file owned by this user (uid {st.st_uid}); remove it")
    except BaseException:
        os.close(fd)
        raise
    return fd


def shm_path_for(socket_path: str, name: str = "") -> str:
    """The pool file of the service listening on `socket_path` (or named explicitly)."""
    if not name:
        digest = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
        name = f"{POOL_PREFIX}{digest}"
    if "/" in name:
        raise ValueError(f"shared memory name {name!r} must not contain '/'")
    return os.path.join(SHM_DIR, name)


def temp_pool_path(path: str, pid: int) -> str:
    """The hidden name process `pid` creates the pool `path` under before renaming it into place."""
    folder, base = os.path.split(path)
    return os.path.join(folder, f".{base}.{pid}{_TEMP_SUFFIX}")


def create_pool(path: str, size: int, gid: int | None = None) -> tuple[mmap.mmap, int]:
    """Create (replacing a stale file) and map a pool of `size` bytes, owner-only.

    Returns the mapping and an open descriptor holding the pool's flock: keep it open for as
    long as the pool serves (closing it, or the process dying, marks the pool stale). Stale
    temporary files of the same pool (a service killed before its rename) are removed first:
    sweep_stale_pools finds only those of kvtier's own pool names, not of a configured one."""
    folder, base = os.path.split(path)
    sweep_stale_temporaries(folder, lambda pool_name: pool_name == base)
    tmp = temp_pool_path(path, os.getpid())
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
    owner died without its shutdown, e.g. by SIGKILL), and the temporary files of such pools
    that a service killed before its rename left (`sweep_stale_temporaries`). Returns the paths
    removed.

    A pool is stale when its flock can be taken. Between that test and the unlink a new service
    could rename its pool over the same name; the inode is compared just before unlinking, which
    leaves a window of two system calls (and such a service would be on the dead one's socket)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = [path for path in (os.path.join(folder, n) for n in names if n.startswith(prefix))
               if _unlink_if_unlocked(path)]
    return removed + sweep_stale_temporaries(folder, lambda pool_name: pool_name.startswith(prefix), names)


def sweep_stale_temporaries(folder: str, pool_name: Callable[[str], bool],
                            names: list[str] | None = None) -> list[str]:
    """Unlink this user's temporary pool files in `folder` (`.<pool>.<pid>.new`, create_pool)
    whose pool name passes `pool_name`, whose creator pid is not a live process, and whose flock
    nobody holds. Returns the paths removed.

    Both tests are needed: the flock alone is not proof, since a live creator holds it only from
    just after its create; the pid alone is not either, since a descriptor (and its flock) can
    outlive its creator in a forked child. A creator in another pid namespace that shares this
    folder is the one case the pid cannot tell: if it is between its create and its flock when
    this runs, its flock or its rename then fails, and so does its start (it never serves a pool
    that was unlinked under it)."""
    if names is None:
        try:
            names = os.listdir(folder)
        except OSError:
            return []
    removed: list[str] = []
    for name in names:
        found = _TEMP_NAME.fullmatch(name)
        if found is None or not pool_name(found["pool"]) or _pid_alive(int(found["pid"])):
            continue
        path = os.path.join(folder, name)
        if _unlink_if_unlocked(path):
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (another user's too); an impossible pid counts as alive."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _unlink_if_unlocked(path: str) -> bool:
    """Unlink `path` if it is this user's regular file and its flock can be taken (nobody holds
    it), checking just before the unlink that the name still names the file tested."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False  # gone already, not ours, or a symlink
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live service holds it
        if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
            return False  # replaced meanwhile: not the file we found unlocked
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class PoolError(ConfigError):
    """The pool a service handed over is not one this client may map."""


def map_pool_fd(fd: int, size: int, owner_uids: frozenset[int] | set[int]) -> mmap.mmap:
    """Map the pool a service sent as a descriptor (client side), after checking it.

    It must be a regular file owned by one of `owner_uids` (the service's uid), at least
    `size` bytes, and not readable or writable by other users. The caller closes `fd`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PoolError("the service sent a pool descriptor that is not a regular file")
    if st.st_uid not in owner_uids:
        raise PoolError(f"the service's pool is owned by uid {st.st_uid}, not by the service ({sorted(owner_uids)})")
    if st.st_mode & 0o007:
        raise PoolError(f"the service's pool has mode {stat.S_IMODE(st.st_mode):o}: other users can open it")
    if size <= 0 or st.st_size < size:
        raise PoolError(f"the service's pool has {st.st_size} bytes, the service announced {size}")
    return _map(fd, size)


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
