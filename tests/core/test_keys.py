import hashlib
import struct
import subprocess
import sys

import pytest

from kvtier.core import keys
from kvtier.core.errors import ConfigError

LAYOUT_ID = bytes(range(16))


def root(mode: str = "sha256", **kw) -> bytes:
    return keys.Namespace("model-a", LAYOUT_ID, hash_mode=mode, **kw).root()


def test_golden_digests_sha256():
    r = root()
    assert r.hex() == "12938098899181044fefbe04306c9a4ce3e90a0de2b201bc53549dd1fe4ebbf9"
    got = [k.hex() for k in keys.chunk_keys(r, list(range(40)), 16)]
    assert got == [
        "b19e1f8e1f6f0bb95ff073ce58776795f1e12df4c44a708d9d090ca2ddf77ece",
        "ec19df52bb8e4f86e110bb9be45956fb4803e505b1334a5a617517736e7bf8cd",
    ]


@pytest.mark.parametrize(
    "mode,root_hex,first_hex",
    [
        ("xxh3_128", "c78542c4fb1034e88e50ced6fae023dc", "02c2c764f1416027b3ca995d0cee5069"),
        ("blake2b", "71f12115073e854f8f13dd5d0d4f97b8019ab3ec1b307700b8ce58341b69f1ae",
         "fef71c5e01d054a7448af0b1a2ec8fc64a15f93fb2573da8fbb1a3d1b94df189"),
    ],
)
def test_golden_digests_other_modes(mode, root_hex, first_hex):
    r = root(mode)
    assert r.hex() == root_hex
    assert keys.chunk_keys(r, list(range(40)), 16, mode)[0].hex() == first_hex


def test_golden_with_extra_key():
    k = keys.chunk_keys(root(), list(range(16)), 16, extra_keys=[b"lora:x"])[0]
    assert k.hex() == "5ef7fcd9ebefa18a16456016776e0213687b0c9796c7f9ceeb93bbaed8075fd4"


def test_chunk_key_matches_spec():
    """The documented framing, re-derived with hashlib: parent | extras frame (u32 count, ...) | tokens LE u32."""
    r = root()
    toks = list(range(100, 116))
    tb = struct.pack("<16I", *toks)
    expect = hashlib.sha256(r + struct.pack("<I", 0) + tb).digest()
    assert keys.chunk_keys(r, toks, 16)[0] == expect
    assert keys.chunk_key(keys.get_hash_mode("sha256"), r, tb) == expect
    lora = hashlib.sha256(r + struct.pack("<II", 1, 6) + b"lora:x" + tb).digest()
    assert keys.chunk_keys(r, toks, 16, extra_keys=[b"lora:x"])[0] == lora


def test_partial_key_matches_spec_and_differs_from_full_keys():
    """A partial chunk: parent | extras frame with the partial mark | its tokens (fewer than a chunk)."""
    r = root()
    chain = keys.KeyChain(r, 16)
    chain.extend(list(range(40)))  # two full chunks, 8 pending
    tb = struct.pack("<8I", *range(32, 40))
    mark = keys.PARTIAL_CHUNK_MARK
    expect = hashlib.sha256(chain.keys[-1] + struct.pack("<II", 1, len(mark)) + mark + tb).digest()
    assert chain.partial_key() == expect
    assert expect.hex() == "41f02d38ab645963ee556e000ffa964b164d7425fee7a357798faf54c040742b"
    # a chain whose extras spell the mark still gives full chunks of 16 tokens, never 8
    spoof = keys.KeyChain(chain.keys[-1], 16, extra_keys=[mark])
    assert expect not in spoof.extend(list(range(32, 48)))
    # every different tail gives a different key; none equals a full chunk's
    other = keys.KeyChain(r, 16)
    other.extend(list(range(39)))
    assert other.partial_key() not in (expect, *chain.keys)
    # extras are part of it, as for full chunks
    lora = keys.KeyChain(r, 16, extra_keys=[b"lora:x"])
    lora.extend(list(range(40)))
    assert lora.partial_key() != expect


def test_partial_key_is_none_on_a_chunk_boundary():
    chain = keys.KeyChain(root(), 16)
    assert chain.partial_key() is None
    chain.extend(list(range(32)))
    assert chain.partial_key() is None
    chain.extend([1])
    assert chain.partial_key() is not None


def test_keychain_extends_incrementally():
    r = root()
    toks = list(range(1000, 1100))
    chain = keys.KeyChain(r, 16)
    got = []
    for i in range(0, 100, 7):
        got += chain.extend(toks[i : i + 7])
    assert got == keys.chunk_keys(r, toks, 16)
    assert len(chain) == 6 and chain.num_tokens == 100


def test_prefix_sharing_and_divergence():
    r = root()
    a = keys.chunk_keys(r, list(range(64)), 16)
    b = keys.chunk_keys(r, list(range(48)) + [7] * 16, 16)
    assert a[:3] == b[:3] and a[3] != b[3]


def test_namespace_separates_models_layouts_tenants_ranks_modes():
    base = keys.Namespace("m", LAYOUT_ID)
    variants = [
        keys.Namespace("m2", LAYOUT_ID),
        keys.Namespace("m", bytes(16)),
        keys.Namespace("m", LAYOUT_ID, tp_rank=1),
        keys.Namespace("m", LAYOUT_ID, tenant_salt="t"),
        keys.Namespace("m", LAYOUT_ID, hash_mode="blake2b"),
        keys.Namespace("m", LAYOUT_ID, extras=("lora:a",)),
    ]
    roots = {v.root() for v in variants} | {base.root()}
    assert len(roots) == len(variants) + 1


def test_framing_tokens_cannot_spell_an_extra_key():
    """Tokens whose bytes spell an extra-key frame never give the key of a chunk with that extra key."""
    r = root()
    mode = keys.get_hash_mode("sha256")
    toks = list(range(16))
    with_extra = keys.chunk_key(mode, r, keys.tokens_to_bytes(toks), [b"abcd"])
    # the bytes after the parent in the extra-key message, moved into the token part
    spelled = (1).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd" + keys.tokens_to_bytes(toks)
    assert keys.chunk_key(mode, r, spelled[4:]) != with_extra
    assert keys.chunk_key(mode, r, spelled) != with_extra
    # and two chunks of 8 never equal one chunk of 16
    two = keys.chunk_keys(r, toks, 8)
    one = keys.chunk_keys(r, toks, 16)
    assert one[0] not in two


def test_namespace_fields_framed_unambiguously():
    a = keys.Namespace("ab", LAYOUT_ID, tenant_salt="c").root()
    b = keys.Namespace("a", LAYOUT_ID, tenant_salt="bc").root()
    assert a != b


def test_keys_equal_across_processes():
    code = (
        "from kvtier.core import keys;"
        "r=keys.Namespace('model-a', bytes(range(16))).root();"
        "print(keys.chunk_keys(r, list(range(40)), 16)[1].hex())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2)
    }
    assert outs == {"ec19df52bb8e4f86e110bb9be45956fb4803e505b1334a5a617517736e7bf8cd"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        keys.tokens_to_bytes([1, -5])
    with pytest.raises(ValueError, match="outside"):
        keys.tokens_to_bytes([2**32])
    with pytest.raises(TypeError, match="integers"):
        keys.tokens_to_bytes([1, "x"])
    with pytest.raises(ConfigError, match="hash_mode"):
        keys.Namespace("m", LAYOUT_ID, hash_mode="md5")
    with pytest.raises(ValueError, match="root key"):
        keys.KeyChain(b"short", 16)
    with pytest.raises(ConfigError, match="model_fingerprint"):
        keys.Namespace("", LAYOUT_ID)


def test_partial_chunk_has_no_key():
    assert keys.chunk_keys(root(), list(range(15)), 16) == []


def test_model_fingerprint_depends_on_config_and_weights():
    a = keys.model_fingerprint('{"layers": 2}', "w1")
    assert a != keys.model_fingerprint('{"layers": 2}', "w2")
    assert a != keys.model_fingerprint('{"layers": 3}', "w1")
    assert a == keys.model_fingerprint('{"layers": 2}', "w1")
