"""wait_lower through a real `kvtier serve`: a commit answers once the chunks are in DRAM, and
wait_lower answers once their lower-tier writes (here a shared folder) have ended (pd.py's producer)."""

import os

import pytest

from kvtier.core.config import DiskTierConfig, LowerTierConfig, MemoryTierConfig, StoreConfig
from kvtier.core.errors import ConfigError
from kvtier.service import protocol as p
from kvtier.store import TieredStore
from tests.conftest import CHUNK, TINY
from tests.service.util import ServiceProcess, cleanup, save_chain, service_config, short_tmpdir


def test_wait_lower_answers_once_the_shared_folder_holds_the_chunks():
    folder = short_tmpdir()
    shared = os.path.join(folder, "shared")
    cfg = service_config(folder)
    cfg["store"]["lower_tiers"] = [{"shared_folder": {"root": shared, "owner": True}}]
    svc = ServiceProcess(cfg, folder).start()
    try:
        c = svc.client()
        root = c.namespace("wait-lower").root()
        keys = c.chunk_keys(root, list(range(5 * CHUNK)))
        save_chain(c, keys, root).wait()  # in the service's DRAM
        assert c.wait_lower(keys, 30.0) == 0
        # another host's store over the folder, opened now, finds all five
        other = TieredStore(StoreConfig(chunk_tokens=CHUNK, memory=MemoryTierConfig(capacity_bytes=1 << 20),
                                        lower_tiers=(LowerTierConfig(name="shared", disk=DiskTierConfig(
                                            root=shared, capacity_bytes=1 << 30, read_only=True)),)), TINY)
        assert other.lookup(keys).hits == 5
        other.close()
        assert c.wait_lower(keys, 0.0) == 0  # nothing queued any more
        with pytest.raises(ValueError, match="timeout_s"):
            c.wait_lower(keys, -1.0)
        with pytest.raises(ValueError, match="timeout_s"):
            c.wait_lower(keys, p.MAX_WAIT_LOWER_S + 1)
        c.close()
    finally:
        svc.stop()
        cleanup(folder)


def test_publish_wait_s_is_bounded_by_the_services_longest_wait():
    from kvtier.connectors.vllm.config import load_connector_config

    assert load_connector_config({"publish_wait_s": 0}, 16).publish_wait_s == 0
    with pytest.raises(ConfigError, match="publish_wait_s"):
        load_connector_config({"publish_wait_s": p.MAX_WAIT_LOWER_S + 1}, 16)
    with pytest.raises(ConfigError, match="publish_wait_s"):
        load_connector_config({"publish_wait_s": -1}, 16)
