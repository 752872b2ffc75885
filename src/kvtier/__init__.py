"""kvtier: a KV-cache memory manager for LLM inference (tiered prefix cache, sparse attention)."""

__version__ = "0.1.0"
