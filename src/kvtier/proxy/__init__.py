"""`kvtier proxy`: an OpenAI-compatible front for vLLM instances, in one of two modes: a prefill and
a decode instance (server.py), or cache-aware routing over several instances (routing.py)."""

from kvtier.proxy.server import ProxyConfig, make_app, run_proxy

__all__ = ["ProxyConfig", "make_app", "run_proxy"]
