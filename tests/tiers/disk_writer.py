"""Helper process for the disk tier's crash and multi-process tests.

    python tests/tiers/disk_writer.py ROOT SEED CAPACITY_BYTES [WRITES]

Waits for a line on stdin (so a test can start it ahead of time and hide the interpreter's
start-up), opens ROOT as the owner, prints "open", then writes whole chains (parents before
children), picked at random from NUM_CHAINS fixed chains: forever, or WRITES chains and
then prints "done". Keys and payloads derive only from the chain number, so any process
can check what it reads. Odd seeds fsync each chunk (a wider window for a kill to land in
a write). No numpy, so the process starts fast.
"""

from __future__ import annotations

import hashlib
import random
import sys

from kvtier.core.codec import checksum
from kvtier.core.config import DiskTierConfig
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import ChunkMeta
from kvtier.tiers.disk import DiskTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float32")
CHUNK = 4
NUM_CHAINS = 48
ROOT_KEY = b"\0" * 32


def chain_keys(c: int) -> list[bytes]:
    keys = []
    parent = ROOT_KEY
    for i in range(1 + c % 5):
        parent = hashlib.sha256(b"disk-writer" + c.to_bytes(4, "little") + parent + bytes([i])).digest()
        keys.append(parent)
    return keys


def layer_payload(key: bytes, layer: int) -> bytes:
    return hashlib.shake_256(key + bytes([layer])).digest(LAYOUT.layer_bytes(CHUNK))


def write_chain(tier: DiskTier, c: int) -> None:
    parent = ROOT_KEY
    for depth, key in enumerate(chain_keys(c)):
        layers = [layer_payload(key, layer) for layer in range(LAYOUT.num_layers)]
        meta = ChunkMeta(key, parent, depth, CHUNK, tuple(checksum(x) for x in layers))
        tier.write(meta, layers)
        parent = key


def main() -> None:
    root, seed, capacity = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    writes = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    sys.stdin.readline()
    tier = DiskTier(LAYOUT, CHUNK, DiskTierConfig(root=root, capacity_bytes=capacity, fsync=seed % 2 == 1))
    print("open", flush=True)
    rng = random.Random(seed)
    n = 0
    while writes < 0 or n < writes:
        write_chain(tier, rng.randrange(NUM_CHAINS))
        n += 1
    tier.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
