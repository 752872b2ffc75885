"""Helpers shared by the benchmarks: medians, tables, JSON output, page-cache control."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def write_json(path: str | os.PathLike[str] | None, data: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2))
    print(f"wrote {p}")


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Evict these files from the page cache (posix_fadvise DONTNEED after a sync)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_folder_cache(folder: str | os.PathLike[str]) -> None:
    """Evict a disk or shared-folder tier's chunk files from the page cache (a file removed
    meanwhile is skipped): the next read of them is a read of the device, as another host's is."""
    for file in Path(folder).glob("chunks/*/*.kvc"):
        try:
            drop_page_cache([file])
        except OSError:
            pass


def device_read_bytes(pid: int | None = None) -> int:
    """Bytes a process (this one by default) caused to be read from a block device
    (/proc/<pid>/io read_bytes): reads served by the page cache or tmpfs count nothing."""
    path = f"/proc/{'self' if pid is None else pid}/io"
    with open(path) as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"{path} has no read_bytes line")


def read_from_device(device_bytes: int | None, loaded_bytes: int) -> bool | None:
    """Whether disk-tier hits that loaded `loaded_bytes` read them from a block device, given the
    bytes the reading process read from one meanwhile. False when that is under a tenth of them:
    the tier's folder is on tmpfs, or dropping its page cache did nothing, and the "disk" hits
    read RAM. None when nothing was loaded from disk or the device count is unknown."""
    if device_bytes is None or loaded_bytes <= 0:
        return None
    return device_bytes >= loaded_bytes // 10
