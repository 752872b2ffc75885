"""The transformers connector and devices: inputs on the model's device, one device per model,
clear errors for a cache elsewhere, and a fingerprint that copies only its samples to the host."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from kvtier.connectors import copy_engine
from kvtier.connectors.transformers import TransformersConnector, UnsupportedModelError, identity
from kvtier.connectors.transformers.cache import _make_plan
from kvtier.core.errors import LayoutMismatchError
from tests.connectors.transformers.prefix_util import make_store, prompt, tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def test_plan_tensors_are_built_on_the_given_device():
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    plan = _make_plan(ids, [5, 3], [4, 0], 0, torch.device("meta"), [0, 0])
    inputs = plan.model_inputs()
    assert {t.device.type for t in inputs.values()} == {"meta"}  # ids, mask and positions
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}
    assert plan.full_input_ids.device.type == "meta"


def test_prepare_hands_inputs_on_the_connectors_device(model, tmp_path):
    store = make_store(model, None)
    conn = TransformersConnector(model, store)
    assert conn.device == torch.device("cpu")
    conn.device = torch.device("meta")  # as if the model lived on an accelerator
    plan = conn.new_cache().prepare(prompt(model.config.vocab_size, 9, seed=1))
    assert plan.model_inputs()["input_ids"].device.type == "meta"
    store.close()


def test_weights_on_several_devices_are_refused(tmp_path):
    split = tiny_model()
    split.lm_head.to("meta")
    store = make_store(split, None)
    with pytest.raises(UnsupportedModelError, match="several devices"):
        TransformersConnector(split, store)
    store.close()


def test_a_cache_device_other_than_the_models_is_refused(model):
    store = make_store(model, None)
    with pytest.raises(LayoutMismatchError, match="device=meta: the model runs on cpu"):
        TransformersConnector(model, store, device="meta")
    TransformersConnector(model, store, device="cpu")  # the model's own device is fine
    store.close()


def test_kv_from_another_device_than_the_cache_is_a_clear_error(model):
    store = make_store(model, None)
    conn = TransformersConnector(model, store)
    cache = conn.new_cache()
    plan = cache.prepare(prompt(model.config.vocab_size, 9, seed=2))
    conn.device = torch.device("meta")  # the cache now expects KV on another device than the model makes it
    with pytest.raises(LayoutMismatchError, match="on cpu; the plan expects .* on meta"):
        with torch.no_grad():
            model(**plan.model_inputs(), **conn.cache_kwargs(cache))
    store.close()


def _old_digest(model: torch.nn.Module) -> str:
    """The weight digest as it was computed before sampling moved to the device (whole tensors copied)."""
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    h = hashlib.blake2b(digest_size=32)
    h.update(f"sampled-{identity.SAMPLES_PER_TENSOR}x{identity.SAMPLE_BYTES}".encode())
    for name, p in params:
        head = f"{name}|{str(p.dtype)}|{tuple(p.shape)}".encode()
        h.update(struct.pack("<I", len(head)) + head)
        raw = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        n = raw.numel()
        if n <= identity.SAMPLES_PER_TENSOR * identity.SAMPLE_BYTES:
            h.update(raw.numpy().tobytes())
            continue
        last = n - identity.SAMPLE_BYTES
        for i in range(identity.SAMPLES_PER_TENSOR):
            off = last * i // (identity.SAMPLES_PER_TENSOR - 1)
            h.update(raw[off:off + identity.SAMPLE_BYTES].numpy().tobytes())
    return h.hexdigest()


def test_fingerprint_copies_only_the_samples_and_keeps_its_value(monkeypatch):
    big = tiny_model(hidden=256, vocab=4096)  # embedding and lm_head: 4 MiB each
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 1 << 20)  # force sampling
    copied: list[int] = []
    real = identity._to_host

    def spy(raw: torch.Tensor) -> bytes:
        copied.append(raw.numel())
        return real(raw)

    monkeypatch.setattr(identity, "_to_host", spy)
    digest = identity.weight_digest(big)
    cap = identity.SAMPLES_PER_TENSOR * identity.SAMPLE_BYTES
    assert len(copied) == len(list(big.parameters())) and max(copied) == cap  # the 4 MiB tensors: 64 KiB each
    assert digest == _old_digest(big)  # stored keys stay valid


def test_same_device_reads_an_unindexed_name_as_the_current_one():
    assert copy_engine.same_device(torch.device("cpu"), torch.device("cpu"))
    assert not copy_engine.same_device(torch.device("cpu"), torch.device("meta"))
    assert copy_engine.same_device(torch.device("cuda"), torch.device("cuda:0")) == (
        not torch.cuda.is_available() or torch.cuda.current_device() == 0)
    assert not copy_engine.same_device(torch.device("cuda:0"), torch.device("cuda:1"))


def test_choose_device_and_staging_on_cpu():
    assert copy_engine.choose_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    buf, pinned = copy_engine.staging_buffer(1024, "cpu")
    assert buf.numel() == 1024 and not pinned and not buf.is_pinned()


def test_refused_pinning_falls_back_with_one_warning(caplog):
    def refuse(n, dtype, pin_memory=False):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc failed: out of locked memory")
        return torch.empty(n, dtype=dtype)

    copy_engine._warned.discard("pin")
    with caplog.at_level("WARNING", logger="kvtier.connectors.copy_engine"):
        buf, pinned = copy_engine.staging_buffer(64, torch.device("cuda"), allocate=refuse)
        copy_engine.staging_buffer(64, torch.device("cuda"), allocate=refuse)
    assert buf.numel() == 64 and not pinned
    assert sum("page-locked host memory was refused" in r.message for r in caplog.records) == 1


def test_layer_copies_on_cpu_are_complete_at_once():
    copies = copy_engine.LayerCopies("cpu")
    src = torch.arange(10, dtype=torch.float32)
    out = copies.copy(3, src)
    copies.ready(3)
    assert out is not None and torch.equal(out, src) and copies.failed(3) is None


def test_layer_copy_error_marks_the_layer_failed():
    class Broken(torch.Tensor):
        def to(self, *a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    copies = copy_engine.LayerCopies("cpu")
    assert copies.copy(0, torch.zeros(2).as_subclass(Broken)) is None
    assert "illegal memory access" in copies.failed(0)


def test_probes_need_cuda():
    assert copy_engine.host_to_device_probe("cpu") is None
