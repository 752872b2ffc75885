"""`kvtier proxy`: an OpenAI-compatible front for a prefill and a decode vLLM instance (server.py)."""

from kvtier.proxy.server import ProxyConfig, make_app, run_proxy

__all__ = ["ProxyConfig", "make_app", "run_proxy"]
