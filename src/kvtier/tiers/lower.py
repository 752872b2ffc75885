"""Building the tiers below DRAM and the first disk tier (StoreConfig.lower_tiers).

Who calls: TieredStore.__init__, once per configured lower tier, in order.

    make_lower_tier(config, layout, chunk_tokens, metrics) -> Tier

Each kind (a field of LowerTierConfig) maps to the function that builds its tier; a new kind
(a Mooncake store, say) is one entry here and one field there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtier.core import metrics as m
from kvtier.core.config import LowerTierConfig
from kvtier.core.layout import KVLayout
from kvtier.tiers.base import Tier

TierFactory = Callable[[KVLayout, int, Any, m.Metrics, str], Tier]


def _disk(layout: KVLayout, chunk_tokens: int, config: Any, metrics: m.Metrics, name: str) -> Tier:
    from kvtier.tiers.disk import DiskTier

    tier = DiskTier(layout, chunk_tokens, config, metrics)
    tier.name = name  # an instance attribute: its metrics and lookups carry the configured name
    return tier


def _redis(layout: KVLayout, chunk_tokens: int, config: Any, metrics: m.Metrics, name: str) -> Tier:
    from kvtier.tiers.redis import RedisTier  # needs the `redis` extra: imported only when configured

    return RedisTier(layout, chunk_tokens, config, metrics, name=name)


def _shared_folder(layout: KVLayout, chunk_tokens: int, config: Any, metrics: m.Metrics, name: str) -> Tier:
    from kvtier.tiers.shared_folder import SharedFolderTier

    return SharedFolderTier(layout, chunk_tokens, config, metrics, name=name)


LOWER_TIER_FACTORIES: dict[str, TierFactory] = {"disk": _disk, "redis": _redis, "shared_folder": _shared_folder}


def make_lower_tier(config: LowerTierConfig, layout: KVLayout, chunk_tokens: int, metrics: m.Metrics) -> Tier:
    return LOWER_TIER_FACTORIES[config.kind](layout, chunk_tokens, config.settings, metrics, config.tier_name)


__all__ = ["LOWER_TIER_FACTORIES", "make_lower_tier"]
