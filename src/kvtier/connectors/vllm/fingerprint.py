"""Model identity for kvtier keys: the model's config plus an identity of its weights.

A chunk saved for one model must never be served to another, including a model rebuilt
at the same path with other weights. The weight identity hashes, for every weight file
of a local model folder (sorted by name): its name, its size, its safetensors header
(tensor names, dtypes, shapes, offsets) and its bytes: all of them for files up to
`FULL_HASH_BYTES`, else `SAMPLES` windows of `SAMPLE_BYTES` spread evenly over the file.
File paths and mtimes are left out on purpose, so copies of one model on several hosts
(or in a shared folder) share their cache. A hub id that is not cached locally is
identified by id and revision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

from kvtier.core.keys import model_fingerprint

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
FULL_HASH_BYTES = 64 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


def file_identity(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    h.update(os.path.basename(path).encode() + b"\0" + str(size).encode())
    with open(path, "rb") as f:
        if path.endswith(".safetensors") and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= min(size - 8, 100 << 20):
                h.update(f.read(header_len))
        if size <= FULL_HASH_BYTES:
            f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def weight_identity(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """See the module's text. A hub id is looked for in `download_dir` (vLLM's --download-dir,
    where it downloaded the model) first, then in the default Hugging Face cache."""
    folder = model if os.path.isdir(model) else None
    if folder is None and download_dir:
        folder = _hub_snapshot(model, revision, download_dir)
    if folder is None:
        folder = _hub_snapshot(model, revision)
    if folder is None:
        return f"hub:{model}@{revision or 'main'}"
    parts = []
    for root, _dirs, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES):
                path = os.path.join(root, name)
                parts.append(f"{os.path.relpath(path, folder)}:{file_identity(path)}")
    if not parts:
        return f"no-weight-files:{os.path.basename(os.path.abspath(folder))}"
    return "\n".join(parts)


def _hub_snapshot(model: str, revision: str | None, cache_dir: str | None = None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(model, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not installed, not cached, or not a hub id: identify by name
        return None


@functools.lru_cache(maxsize=256)
def lora_extras(lora: str) -> tuple[str, ...]:
    """The namespace extras of a LoRA adapter, given as scheduler.lora_key makes it ("" for none,
    else "name\npath"): its name and the identity of its weight files, as the base model's are
    identified (an adapter of one name at another path, or rebuilt with other weights, is other
    KV). A path that is no local folder is identified by the path itself. Cached per process."""
    if not lora:
        return ("lora=",)
    name, _, path = lora.partition("\n")
    identity = weight_identity(path) if path and os.path.isdir(path) else f"path:{path}"
    return (f"lora={name}", "lora_weights=" + hashlib.sha256(identity.encode()).hexdigest())


def canonical_config(config: Mapping[str, Any]) -> str:
    """Config dict as canonical JSON (sorted keys; paths and names that do not change the math dropped)."""
    drop = {"_name_or_path", "transformers_version", "_commit_hash", "name_or_path"}
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True, default=str)


def vllm_model_fingerprint(vllm_config: Any) -> str:
    """Fingerprint of the model vLLM serves: HF config, dtype, quantization, KV dtype and weights."""
    mc = vllm_config.model_config
    hf = mc.hf_config.to_dict() if hasattr(mc.hf_config, "to_dict") else dict(vars(mc.hf_config))
    engine = {
        "dtype": str(mc.dtype),
        "quantization": str(getattr(mc, "quantization", None)),
        "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
    }
    text = canonical_config(hf) + "\n" + json.dumps(engine, sort_keys=True)
    download_dir = getattr(getattr(vllm_config, "load_config", None), "download_dir", None)
    weights = weight_identity(str(mc.model), getattr(mc, "revision", None), download_dir)
    if weights.startswith("hub:"):
        log.warning("kvtier: the weights of %s were not found on this host; its KV is keyed by its id and "
                    "revision only, so new weights pushed under that revision would share its keys (set "
                    "kv_connector_extra_config.model_fingerprint, or pin a revision)", mc.model)
    return model_fingerprint(text, weights)
