"""stories260K loads into transformers exactly: its logits match an independent numpy forward."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvtier.bench import models  # noqa: E402

pytestmark = pytest.mark.skipif(
    not models.stories_available(),
    reason=f"stories260K weights not found under {models.stories_dir()} (set KVTIER_SHARED_MODELS)",
)


def numpy_forward(w: dict, h: dict, tokens) -> np.ndarray:
    """Independent llama2.c-style forward (interleaved RoPE, ORIGINAL wq/wk). Returns logits [T, V]."""
    dim, nh, nkv = h["dim"], h["n_heads"], h["n_kv_heads"]
    hd = dim // nh
    rep = nh // nkv
    T = len(tokens)
    x = w["tok_emb"][np.asarray(tokens)].astype(np.float64)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5) * g

    pos = np.arange(T)[:, None]
    freqs = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))          # [hd/2]
    ang = pos * freqs[None, :]                                       # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v [T, H, hd], pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(h["n_layers"]):
        xn = rms(x, w["attn_norm"][layer])
        q = (xn @ w["wq"][layer].T).reshape(T, nh, hd)
        k = (xn @ w["wk"][layer].T).reshape(T, nkv, hd)
        v = (xn @ w["wv"][layer].T).reshape(T, nkv, hd)
        q, k = rope(q), rope(k)
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, dim)
        x = x + o @ w["wo"][layer].T
        xn = rms(x, w["ffn_norm"][layer])
        g = xn @ w["w1"][layer].T
        u = xn @ w["w3"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w["w2"][layer].T
    x = rms(x, w["final_norm"])
    return x @ w["wcls"].T


def test_stories_logits_match_numpy_reference():
    model = models.load_stories260k()
    h, w = models.read_llama2c(str(models.stories_dir() / "stories260K.bin"))
    prompt = [1, 403, 407, 261, 378, 1420 % 512, 300, 266, 9, 85, 44, 400, 32, 265, 372, 300, 288, 270, 271, 46]
    ref = numpy_forward(w, h, prompt)[-1]
    with torch.no_grad():
        got = model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    assert np.abs(ref - got).max() < 1e-4


def test_stories_generates_a_story():
    model = models.load_stories260k()
    vocab, _ = models.load_tok512()
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=30, do_sample=False)
    text = models.decode(out[0].tolist(), vocab)
    assert text.startswith("Once upon a time")
