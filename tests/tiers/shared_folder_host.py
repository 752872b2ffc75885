"""A process standing for one host of a shared folder, driven line by line over stdin/stdout.

    python tests/tiers/shared_folder_host.py ROOT owner|member CAPACITY_BYTES [LAYER_BYTES] [RESCAN_S]

Prints {"ready": pid} once the tier is open, then answers each command line with one JSON line:

    write 1,2,3     write the chain key(1) -> key(2) -> key(3), parents first: [stored, ...]
    lookup 1,2,3    leading chunks found: n
    touch 1,2       tell the tier these chunks were hits (as the store does after a lookup)
    read 3          "hit" (bytes verified against the expected payload), "miss" or "wrong"
    poll 1,2,...    until every key is found: read each as soon as its lookup finds it;
                    {"hit": n, "wrong": n, "miss": n} (a miss is a key deleted again meanwhile)
    rescan          the owner's RescanReport as a dict
    delete 3        True/False, or {"error": message}
    stats           {"used": bytes, "chunks": n, "evictions": n, "checksum_failures": n}
    quit

Keys and payloads derive only from the key's number, so every process can check what it reads.
No numpy, so the process starts fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

from kvtier.core import metrics as m
from kvtier.core.codec import checksum
from kvtier.core.config import SharedFolderTierConfig
from kvtier.core.errors import KVTierError
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import ChunkMeta
from kvtier.tiers.shared_folder import SharedFolderTier

ROOT_KEY = b"\0" * 32
CHUNK = 4


def key_of(i: int) -> bytes:
    return hashlib.sha256(f"chunk-{i}".encode()).digest()


def layout_for(layer_bytes: int) -> KVLayout:
    """Two float32 layers of `layer_bytes` each (2 planes x CHUNK tokens x 2 heads x head_size)."""
    return KVLayout(num_layers=2, num_kv_heads=2, head_size=layer_bytes // (2 * CHUNK * 2 * 4), dtype="float32")


def layer_payload(key: bytes, layer: int, nbytes: int) -> bytes:
    return hashlib.shake_256(key + bytes([layer])).digest(nbytes)


def ids(arg: str) -> list[int]:
    return [int(x) for x in arg.split(",") if x]


def main() -> None:
    root, role, capacity = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layer_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    rescan_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    layout = layout_for(layer_bytes)
    config = SharedFolderTierConfig(root=root, capacity_bytes=capacity, owner=role == "owner", rescan_s=rescan_s,
                                    revalidate_s=0.0, policy="lru")
    tier = SharedFolderTier(layout, CHUNK, config)
    lb = tier.layer_bytes

    def payload(key: bytes) -> list[bytes]:
        return [layer_payload(key, layer, lb) for layer in range(layout.num_layers)]

    def read(key: bytes) -> str:
        dests = [bytearray(lb) for _ in range(layout.num_layers)]
        meta = tier.read(key, list(range(layout.num_layers)), dests)
        if meta is None:
            return "miss"
        return "hit" if [bytes(d) for d in dests] == payload(key) else "wrong"

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        out: object
        if cmd == "write":
            out = []
            parent = ROOT_KEY
            for depth, i in enumerate(ids(arg)):
                key = key_of(i)
                layers = payload(key)
                meta = ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers))
                out.append(tier.write(meta, layers))
                parent = key
        elif cmd == "lookup":
            out = tier.lookup([key_of(i) for i in ids(arg)])
        elif cmd == "touch":
            tier.touch([key_of(i) for i in ids(arg)])
            out = True
        elif cmd == "read":
            out = read(key_of(int(arg)))
        elif cmd == "poll":
            counts = {"hit": 0, "wrong": 0, "miss": 0}
            waiting = [key_of(i) for i in ids(arg)]
            deadline = time.monotonic() + 60
            while waiting and time.monotonic() < deadline:
                still = []
                for key in waiting:
                    if tier.contains(key):
                        counts[read(key)] += 1
                    else:
                        still.append(key)
                waiting = still
            counts["never_seen"] = len(waiting)
            out = counts
        elif cmd == "rescan":
            try:
                out = dataclasses.asdict(tier.rescan())
            except KVTierError as e:
                out = {"error": str(e)}
        elif cmd == "delete":
            try:
                out = tier.delete(key_of(int(arg)))
            except KVTierError as e:
                out = {"error": str(e)}
        elif cmd == "stats":
            usage = tier.usage()
            out = {"used": usage.used_bytes, "chunks": usage.chunks,
                   "evictions": tier.metrics.get(m.EVICTIONS, tier=tier.name),
                   "checksum_failures": tier.metrics.get(m.CHECKSUM_FAILURES, tier=tier.name)}
        elif cmd == "quit":
            break
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    tier.close()


if __name__ == "__main__":
    main()
