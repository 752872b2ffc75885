"""Models for tests, benchmarks and the demo: the real stories260K weights and random-weight Llamas.

stories260K is llama2.c's tinyllamas checkpoint (5 layers, vocab 512, 512-token context),
read from ../shared/models/stories260K (override with KVTIER_SHARED_MODELS). llama2.c's
wq/wk use interleaved RoPE pairs; HF Llama rotates halves, so their rows are permuted.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def shared_models_dir() -> Path:
    env = os.environ.get("KVTIER_SHARED_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "models"


def stories_dir() -> Path:
    return shared_models_dir() / "stories260K"


def stories_available() -> bool:
    return (stories_dir() / "stories260K.bin").is_file()


def random_llama(
    num_layers: int = 4,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 1024,
    max_positions: int = 32768,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A float32 Llama with random weights (seeded), eager-free: uses the default sdpa attention."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.eval()
    return model


# Random-weight Llama shapes for `kvtier bench ttft --shape`: Llama-3.1-8B's and Llama-3.2-1B's
# attention and MLP sizes, and a tiny one for smoke tests. Only the shape matters for timing.
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "llama-8b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-1b": dict(num_layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "tiny": dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512),
}


def random_llama_shaped(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        max_positions: int = 131072, seed: int = 0) -> LlamaForCausalLM:
    """A random-weight Llama of a named shape, built directly on `device` in `dtype` (an 8B model
    never passes through host memory or float32)."""
    if shape not in LLAMA_SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {', '.join(LLAMA_SHAPES)}")
    s = LLAMA_SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return model


def read_llama2c(path: str):
    """Return (header dict, dict of numpy float32 arrays in llama2.c layout)."""
    with open(path, "rb") as f:
        raw = f.read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    data = np.frombuffer(raw, dtype=np.float32, offset=28)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = data[off:off + n].reshape(shape).copy()
        off += n
        return a

    w = {}
    w["tok_emb"] = take(vocab, dim)
    w["attn_norm"] = take(n_layers, dim)
    w["wq"] = take(n_layers, dim, dim)          # (out, in) like torch Linear
    w["wk"] = take(n_layers, kv_dim, dim)
    w["wv"] = take(n_layers, kv_dim, dim)
    w["wo"] = take(n_layers, dim, dim)
    w["ffn_norm"] = take(n_layers, dim)
    w["w1"] = take(n_layers, hidden, dim)
    w["w2"] = take(n_layers, dim, hidden)
    w["w3"] = take(n_layers, hidden, dim)
    w["final_norm"] = take(dim)
    off += seq_len * hd // 2 * 2                  # skip freq_cis_real / imag
    w["wcls"] = w["tok_emb"] if shared else take(vocab, dim)
    hdr = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv, vocab_size=vocab, seq_len=seq_len, shared=shared)
    return hdr, w


def _permute(w: np.ndarray, n_heads: int) -> torch.Tensor:
    """llama2.c interleaved-RoPE rows -> HF rotate_half layout."""
    t = torch.from_numpy(w)
    rows, cols = t.shape
    return t.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_stories260k(path: str | os.PathLike[str] | None = None) -> LlamaForCausalLM:
    """stories260K (llama2.c checkpoint) as a float32 transformers LlamaForCausalLM."""
    path = str(path or stories_dir() / "stories260K.bin")
    h, w = read_llama2c(path)
    cfg = LlamaConfig(
        vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"], max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5, tie_word_embeddings=h["shared"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    cfg.rope_theta = 10000.0  # llama2.c default; also the LlamaConfig default
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    sd = {"model.embed_tokens.weight": torch.from_numpy(w["tok_emb"]),
          "model.norm.weight": torch.from_numpy(w["final_norm"]),
          "lm_head.weight": torch.from_numpy(w["wcls"])}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.from_numpy(w["attn_norm"][i])
        sd[p + "post_attention_layernorm.weight"] = torch.from_numpy(w["ffn_norm"][i])
        sd[p + "self_attn.q_proj.weight"] = _permute(w["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _permute(w["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = torch.from_numpy(w["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = torch.from_numpy(w["wo"][i])
        sd[p + "mlp.gate_proj.weight"] = torch.from_numpy(w["w1"][i])
        sd[p + "mlp.down_proj.weight"] = torch.from_numpy(w["w2"][i])
        sd[p + "mlp.up_proj.weight"] = torch.from_numpy(w["w3"][i])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # rotary inv_freq buffers are non-persistent; tied lm_head may be reported either way
    bad = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
    if bad or unexpected:
        raise RuntimeError(f"stories260K load: missing {bad}, unexpected {unexpected}")
    if h["shared"]:
        model.tie_weights()
    model.eval()
    return model


def load_tok512(path: str | os.PathLike[str] | None = None) -> tuple[list[bytes], list[float]]:
    path = str(path or stories_dir() / "tok512.bin")
    """Return (vocab: list[bytes], scores: list[float]) from a llama2.c tokenizer file."""
    with open(path, "rb") as f:
        raw = f.read()
    (max_len,) = struct.unpack_from("i", raw, 0)
    off = 4
    vocab, scores = [], []
    while off < len(raw):
        score, n = struct.unpack_from("fi", raw, off)
        off += 8
        vocab.append(raw[off:off + n])
        scores.append(score)
        off += n
    return vocab, scores


def decode(ids: list[int], vocab: list[bytes]) -> str:
    """llama2.c-style decode: skip BOS/EOS, strip the space after BOS, map <0xXX> to bytes."""
    out = bytearray()
    prev = None
    for t in ids:
        t = int(t)
        if t in (1, 2):  # <s>, </s>
            prev = t
            continue
        piece = vocab[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
        prev = t
    return out.decode("utf-8", errors="replace")
