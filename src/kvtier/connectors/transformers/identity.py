"""What a transformers model's KV depends on: its fingerprint and its KV layout.

    model_identity(model) -> str   kvtier.core.keys.model_fingerprint(config text, weight digest)
    weights_state(model) -> tuple  cheap: changes whenever a weight is modified in place or replaced
    model_layout(model) -> KVLayout

The fingerprint hashes (1) the model's config as canonical JSON, without the fields that do
not change its KV (name or path, transformers version, dtype, attention implementation,
output switches, every underscore field), plus the model class name; and (2) its weights:
every parameter's name, dtype and shape, and its bytes, all of them when the parameters
total at most FULL_HASH_BYTES (256 MiB; the demo and test models, the 200M benchmark model
is sampled), otherwise SAMPLES_PER_TENSOR windows of SAMPLE_BYTES at evenly spaced offsets
of every tensor (first and last bytes included), gathered on the tensor's device so that only
the windows are copied to the host: a deterministic sample, cheap on a 70B model on a GPU,
that any retraining or fine-tune of a tensor changes. A change that touches none of the
sampled windows (a sparse edit of a large model) would not be seen; pass an explicit
`fingerprint=` (for example the checkpoint's revision hash) where that matters.
Dtype is not needed here: it is part of the KV layout, which is part of the namespace.

Weights changed after the fingerprint was taken (a fine-tuning step, `load_state_dict`, a
parameter replaced) would leave a connector naming the new model's KV by the old model's keys.
`weights_state` is what the connector compares before each prefill to see that, without hashing:
each parameter's and persistent buffer's identity, storage address and version counter (which
every in-place write bumps, under no_grad too). When it changed the connector hashes the weights
again (TransformersConnector.refresh_identity).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

from kvtier.connectors.transformers.compat import UnsupportedModelError, decoder_config, text_config
from kvtier.core.keys import model_fingerprint
from kvtier.core.layout import KVLayout

FULL_HASH_BYTES = 256 << 20
SAMPLES_PER_TENSOR = 16
SAMPLE_BYTES = 4096

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}

_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "attn_implementation", "tokenizer_class",
    "architectures", "pruned_heads", "chunk_size_feed_forward",
})


def config_text(config: Any) -> str:
    """Canonical JSON of the config fields that shape the model's computation."""
    data = config.to_dict()
    kept = {k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view, on its own device (no copy for a contiguous tensor)."""
    if t.device.type == "meta":
        raise UnsupportedModelError("the model has weights on the meta device; load them before using kvtier")
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _to_host(raw: torch.Tensor) -> bytes:
    """Bytes of a uint8 tensor, copied to the host: the one place weight bytes leave their device."""
    return raw.to("cpu").numpy().tobytes()


def weight_digest(model: torch.nn.Module) -> str:
    """The parameters' digest, then (only where the model has any, so the digest of a model
    without them is what it always was) its persistent buffers': a quantized model (GPTQ, AWQ)
    keeps its weights in buffers (qweight, scales), which change its KV as much as parameters."""
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    saved = model.state_dict(keep_vars=True).keys()
    buffers = sorted(((n, b) for n, b in model.named_buffers() if n in saved), key=lambda kv: kv[0])
    tensors: list[tuple[str, torch.Tensor | None]] = [*params, *([("\0buffers", None)] if buffers else []), *buffers]
    total = sum(p.numel() * p.element_size() for _, p in params + buffers)
    full = total <= FULL_HASH_BYTES
    h = hashlib.blake2b(digest_size=32)
    h.update(b"full" if full else f"sampled-{SAMPLES_PER_TENSOR}x{SAMPLE_BYTES}".encode())
    for name, p in tensors:
        if p is None:  # where the buffers start
            h.update(name.encode())
            continue
        head = f"{name}|{str(p.dtype)}|{tuple(p.shape)}".encode()
        h.update(struct.pack("<I", len(head)) + head)
        raw = _tensor_bytes(p)
        n = raw.numel()
        if full or n <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
            h.update(_to_host(raw))
            continue
        last = n - SAMPLE_BYTES
        offsets = [last * i // (SAMPLES_PER_TENSOR - 1) for i in range(SAMPLES_PER_TENSOR)]
        # the windows are gathered where the tensor lives, and only they are copied to the host
        h.update(_to_host(torch.cat([raw[off:off + SAMPLE_BYTES] for off in offsets])))
    return h.hexdigest()


def persistent_buffer_names(model: torch.nn.Module) -> frozenset[str]:
    """Names of the buffers a state dict saves (weight_digest hashes those; rotary caches are not)."""
    return frozenset(n for n, _ in model.named_buffers() if n in model.state_dict(keep_vars=True))


def weights_state(model: torch.nn.Module, buffers: frozenset[str] = frozenset()) -> tuple[tuple[Any, ...], ...]:
    """What changes whenever a weight the digest covers changes: per parameter (and per persistent
    buffer named in `buffers`), its name, the tensor's identity, storage address and version counter.
    Microseconds per tensor: no byte is read."""
    out = [(n, id(p), p.data_ptr(), p._version) for n, p in model.named_parameters()]
    if buffers:
        out += [(n, id(b), b.data_ptr(), b._version) for n, b in model.named_buffers() if n in buffers]
    return tuple(out)


def model_identity(model: torch.nn.Module) -> str:
    """kvtier's model fingerprint of a transformers model (config + weight digest)."""
    cfg = text_config(model)
    return model_fingerprint(f"{type(model).__name__}|{config_text(cfg)}", weight_digest(model))


def config_layout(config: Any, dtype: str) -> KVLayout:
    """The KV layout a decoder's config describes: layers, KV heads, head size, in `dtype`."""
    cfg = decoder_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVLayout(cfg.num_hidden_layers, kv_heads, head_dim, dtype)


def model_layout(model: torch.nn.Module, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV layout of a decoder: layers, KV heads, head size, dtype (default: the weights')."""
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in TORCH_DTYPES:
        raise UnsupportedModelError(f"KV dtype {dtype} is not supported; use one of {sorted(map(str, TORCH_DTYPES))}")
    return config_layout(model.config, TORCH_DTYPES[dtype])
