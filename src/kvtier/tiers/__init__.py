"""kvtier.tiers: storage tiers (memory, disk, later redis) and their eviction policies."""
