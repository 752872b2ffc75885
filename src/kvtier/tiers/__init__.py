"""kvtier.tiers: storage tiers (memory, disk, redis; lower.py builds the configured lower tiers) and their eviction policies."""
