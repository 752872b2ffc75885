"""The C loop (kvtier.core._chainhash) against the pure-Python reference in keys.py."""

import os
import random
import subprocess
import sys

import pytest

from kvtier.core import keys

LAYOUT_ID = bytes(range(16))

needs_c = pytest.mark.skipif(
    keys._c_chain_sha256 is None,
    reason="kvtier.core._chainhash is not built (no C compiler or OpenSSL headers at install, "
    "or KVTIER_PURE_PYTHON_KEYS set): only the pure-Python keys are tested",
)


@pytest.fixture(params=["c", "python"])
def backend(request, monkeypatch):
    """Runs a test with KeyChain on the C loop, then on the pure-Python loop."""
    if request.param == "c":
        if keys._c_chain_sha256 is None:
            pytest.skip("kvtier.core._chainhash is not built")
    else:
        monkeypatch.setattr(keys, "_c_chain_sha256", None)
    return request.param


def root(mode: str = "sha256") -> bytes:
    return keys.Namespace("model-a", LAYOUT_ID, hash_mode=mode).root()


def test_key_backend_names_the_loop_in_use():
    assert keys.KEY_BACKEND == ("c" if keys._c_chain_sha256 is not None else "python")


def test_env_var_forces_python():
    code = "from kvtier.core import keys; print(keys.KEY_BACKEND)"
    env = {**os.environ, "KVTIER_PURE_PYTHON_KEYS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "python"


def test_golden_digests_both_backends(backend):
    r = root()
    assert [k.hex() for k in keys.chunk_keys(r, list(range(40)), 16)] == [
        "b19e1f8e1f6f0bb95ff073ce58776795f1e12df4c44a708d9d090ca2ddf77ece",
        "ec19df52bb8e4f86e110bb9be45956fb4803e505b1334a5a617517736e7bf8cd",
    ]
    k = keys.chunk_keys(r, list(range(16)), 16, extra_keys=[b"lora:x"])[0]
    assert k.hex() == "5ef7fcd9ebefa18a16456016776e0213687b0c9796c7f9ceeb93bbaed8075fd4"


@pytest.mark.parametrize(
    "tokens,error,match",
    [
        ([1, -5], ValueError, "outside"),
        ([2**32], ValueError, "outside"),
        ([2**70], ValueError, "outside"),
        ([1, "x"], TypeError, "integers, got str"),
        ([1.0], TypeError, "integers, got float"),
        ([None] * 16, TypeError, "integers, got NoneType"),
    ],
)
def test_bad_tokens_same_errors_both_backends(backend, tokens, error, match):
    with pytest.raises(error, match=match) as info:
        keys.chunk_keys(root(), tokens, 1)
    message = str(info.value)
    # the chain is untouched after a refused extend, with either loop
    chain = keys.KeyChain(root(), 4)
    chain.extend([1, 2, 3])
    with pytest.raises(error) as again:
        chain.extend(tokens)
    assert str(again.value) == message
    assert chain.keys == [] and chain._pending == [1, 2, 3] and chain.num_tokens == 3


def test_bad_token_messages_identical_between_backends(monkeypatch):
    """The same bad token gives the same exception text whether C or Python saw it first."""
    if keys._c_chain_sha256 is None:
        pytest.skip("kvtier.core._chainhash is not built")
    cases = [[1, -5], [2**32], [0, 1, "x"], [3, 2.5], [1, 2, 3, 4, 5, 6, 7, -1]]
    for tokens in cases:
        messages = []
        for use_c in (True, False):
            if not use_c:
                monkeypatch.setattr(keys, "_c_chain_sha256", None)
            with pytest.raises((TypeError, ValueError)) as info:
                keys.chunk_keys(root(), tokens, 4)
            messages.append((type(info.value), str(info.value)))
        assert messages[0] == messages[1], tokens


@needs_c
def test_c_loop_refuses_what_python_refuses():
    """The C function raises on every token the Python conversion rejects (keys.py then re-runs Python)."""
    c = keys._c_chain_sha256
    assert c is not None
    for bad in (-1, 2**32, 2**64, "1", 1.0, None):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            c(bytes(32), b"", [0, bad], 2)
    with pytest.raises(OverflowError):  # the partial last chunk is checked too, as in Python
        c(bytes(32), b"", [0, 1, -1], 2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        c(bytes(32), b"", [0, 1], 0)
    assert c(bytes(32), b"", [True, 2**32 - 1], 2) == keys._chain_python(
        keys.get_hash_mode("sha256"), bytes(32), b"", [1, 2**32 - 1], 2
    )


@needs_c
def test_c_equals_python_on_random_inputs():
    rng = random.Random(7)
    mode = keys.get_hash_mode("sha256")
    c = keys._c_chain_sha256
    assert c is not None
    for _ in range(300):
        chunk = rng.choice([1, 2, 3, 7, 16, 32, 100, 128, 256])
        n = rng.choice([0, 1, chunk - 1, chunk, chunk + 1, rng.randrange(0, 5 * chunk + 3)])
        tokens = [rng.choice([0, 1, 2**32 - 1, rng.randrange(2**32), rng.randrange(200_000)]) for _ in range(n)]
        parent = rng.randbytes(rng.choice([32, 0, 5]))
        extras = keys._frame(*(rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(3))))
        seq = tokens if rng.random() < 0.7 else tuple(tokens)
        assert c(parent, extras, seq, chunk) == keys._chain_python(mode, parent, extras, tokens, chunk)


@needs_c
def test_keychain_c_equals_python_across_extends(monkeypatch):
    """Many extend() calls with pending tails, extras and empty lists give the same keys on both loops."""
    rng = random.Random(11)
    r = root()
    for _ in range(60):
        chunk = rng.choice([1, 4, 16, 64, 128])
        extras = [rng.randbytes(rng.randrange(1, 20)) for _ in range(rng.randrange(3))]
        pieces = []
        for _ in range(rng.randrange(1, 12)):
            size = rng.choice([0, 1, chunk - 1, chunk, rng.randrange(3 * chunk + 2)])
            pieces.append([rng.randrange(2**32) for _ in range(size)])
        results = []
        for use_c in (True, False):
            with monkeypatch.context() as m:
                if not use_c:
                    m.setattr(keys, "_c_chain_sha256", None)
                chain = keys.KeyChain(r, chunk, extra_keys=extras)
                returned = [chain.extend(p) for p in pieces]
                results.append((returned, chain.keys, chain._pending, chain.num_tokens))
        assert results[0] == results[1]
        flat = [t for p in pieces for t in p]
        assert results[0][1] == keys.chunk_keys(r, flat, chunk, extra_keys=extras)


def test_other_modes_stay_python(monkeypatch):
    """Only sha256 takes the C loop; a C function that must not be called proves it for the others."""

    def refuse(*args):
        raise AssertionError("the C loop is sha256 only")

    monkeypatch.setattr(keys, "_c_chain_sha256", refuse)
    for mode in ("blake2b", "xxh3_128"):
        assert len(keys.chunk_keys(root(mode), list(range(40)), 16, mode)) == 2


def test_index_ints_take_the_python_loop(backend):
    """Ids that are not Python ints but have __index__ (numpy's) get the same keys: C refuses them,
    and the Python loop, which accepts them, computes the keys."""
    np = pytest.importorskip("numpy")
    tokens = list(range(1000, 1040))
    assert keys.chunk_keys(root(), [np.int64(t) for t in tokens], 16) == keys.chunk_keys(root(), tokens, 16)
    assert keys.chunk_keys(root(), np.array(tokens, dtype=np.uint32), 16) == keys.chunk_keys(root(), tokens, 16)
