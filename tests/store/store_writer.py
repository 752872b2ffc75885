"""Helper process for the store's crash test: write-through saves onto a disk small enough to evict.

    python tests/store/store_writer.py ROOT SEED MEM_CHUNKS DISK_CHUNKS [SAVES [WRITE_MODE]]

Waits for a line on stdin (so a test can start it ahead of time), opens a TieredStore with a
DRAM tier of MEM_CHUNKS chunks and a disk tier of DISK_CHUNKS chunks under ROOT, prints "open",
then saves prefixes of NUM_CONVERSATIONS fixed conversations the way an engine does: it looks
the prefix up and saves only the chunks the store lacks, after the last one it has. Forever,
or SAVES saves (-1: forever) and then prints "done". WRITE_MODE is the store's (default
write-through).

In write-through mode, after every save it checks that the save did not cut its own chain on disk: the chain's
leading chunks on disk before the save are still there, and a save without errors left the
whole prefix on disk. A violation prints "CUT ..." and exits with status 3. Keys and payloads
derive only from the conversation, so any process can check what it reads.
"""

from __future__ import annotations

import hashlib
import random
import sys

from kvtier.core.config import DiskTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.keys import Namespace, chunk_keys
from kvtier.core.layout import KVLayout
from kvtier.store import TieredStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_size=8, dtype="float32")
CHUNK = 4
NUM_CONVERSATIONS = 12
MAX_CHUNKS = 8
ROOT = Namespace("store-writer", LAYOUT.layout_id(CHUNK)).root()


def conversation_keys(c: int) -> list[bytes]:
    tokens = [(c * 7919 + i * 31) % 50000 for i in range(MAX_CHUNKS * CHUNK)]
    return chunk_keys(ROOT, tokens, CHUNK)


def layer_payload(key: bytes, layer: int) -> bytes:
    return hashlib.shake_256(key + bytes([layer])).digest(LAYOUT.layer_bytes(CHUNK))


def main() -> None:
    root, seed = sys.argv[1], int(sys.argv[2])
    mem_chunks, disk_chunks = int(sys.argv[3]), int(sys.argv[4])
    saves = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    write_mode = sys.argv[6] if len(sys.argv) > 6 else "write-through"
    sys.stdin.readline()
    from kvtier.core.codec import ALIGN

    file_bytes = 3 * ALIGN  # header + two sections, each padded to 4 KiB
    store = TieredStore(
        StoreConfig(
            chunk_tokens=CHUNK,
            memory=MemoryTierConfig(capacity_bytes=mem_chunks * LAYOUT.chunk_bytes(CHUNK)),
            disk=DiskTierConfig(root=root, capacity_bytes=disk_chunks * file_bytes, fsync=seed % 2 == 1),
            write_mode=write_mode,
        ),
        LAYOUT,
    )
    assert store.disk is not None
    print("open", flush=True)
    rng = random.Random(seed)
    n = 0
    while saves < 0 or n < saves:
        keys = conversation_keys(rng.randrange(NUM_CONVERSATIONS))[: rng.randint(1, MAX_CHUNKS)]
        hits = store.lookup(keys).hits
        on_disk_before = store.disk.lookup(keys)
        if hits < len(keys):
            parent = keys[hits - 1] if hits else ROOT
            srcs = [[layer_payload(k, layer) for layer in range(LAYOUT.num_layers)] for k in keys[hits:]]
            result = store.save(keys[hits:], parent, hits, srcs).wait()
            on_disk_after = store.disk.lookup(keys)
            cut = on_disk_after < on_disk_before or (not result.errors and on_disk_after < len(keys))
            if write_mode == "write-through" and cut:
                print(f"CUT {on_disk_before} -> {on_disk_after} of {len(keys)} errors={result.errors}", flush=True)
                sys.exit(3)
        n += 1
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
