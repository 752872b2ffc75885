"""copy_out_of_pool: the service client's section copy out of the shared-memory pool."""

import numpy as np
import pytest

from kvtier.client.service_client import copy_out_of_pool


def test_copy_out_of_pool_copies_every_byte_unchanged() -> None:
    pool = np.arange(3 * 4096, dtype=np.int64).view(np.uint8)  # every byte value, high bits set
    dest = np.zeros(4096, dtype=np.uint8)
    copy_out_of_pool(dest, pool[5000:5000 + 4096])
    assert np.array_equal(dest, pool[5000:5000 + 4096])


def test_copy_out_of_pool_refuses_a_section_cut_short_by_the_pool_end() -> None:
    pool = np.ones(10_000, dtype=np.uint8)
    dest = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError):
        copy_out_of_pool(dest, pool[8192:8192 + 4096])  # 1808 bytes left in the pool
    assert not dest.any()
