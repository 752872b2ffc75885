"""Build configuration that pyproject.toml cannot express: the optional C extension.

kvtier.core._chainhash is KeyChain.extend's sha256 loop in C (it needs a C compiler, Python
headers and OpenSSL's libcrypto headers). optional=True: when it cannot be built, setuptools
warns and installs kvtier without it, and kvtier.core.keys runs its pure-Python loop.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvtier.core._chainhash",
            sources=["src/kvtier/core/_chainhash.c"],
            libraries=["crypto"],
            optional=True,
        )
    ]
)
