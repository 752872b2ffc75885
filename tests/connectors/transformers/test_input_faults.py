"""The transformers connector's inputs, as an audit found them mishandled:

- generate() dropped an all-ones attention mask, so transformers guessed one from pad_token_id
  and masked prompt tokens equal to it; that KV was saved under the prompt's keys;
- prefill(cache=...) took a cache of another connector: one model's KV under another's keys;
- the fingerprint ignored buffers, where quantized models keep their weights;
- multimodal inputs (pixel_values) were accepted though the keys see the token ids only;
- a pad_token_id outside the vocabulary crashed batches whose rows hit the store unequally;
- an empty batch or prompt was a traceback from deep inside the model.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.connectors.transformers import TransformersConnector, kvtier_generate, model_identity
from kvtier.connectors.transformers.compat import UnsupportedModelError
from tests.connectors.transformers.prefix_util import make_store, tiny_model

VOCAB = 128


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1]


@pytest.mark.parametrize("explicit_mask", [True, False])
def test_prompt_tokens_equal_to_the_pad_id_are_computed_and_saved_as_tokens(explicit_mask) -> None:
    model = tiny_model()
    ids = prompt(14, 5)
    ids[3] = ids[10] = 7
    ids = ids[None]
    mask = torch.ones_like(ids)
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=7)
    got = kvtier_generate(model, ids, conn, mask if explicit_mask else None, max_new_tokens=6, do_sample=False,
                          pad_token_id=7)
    assert torch.equal(got, ref)  # the pad-id tokens were masked before
    cache, out = conn.prefill(ids)  # loads the chunks generate saved
    assert cache.last_plan.cached_tokens == (12,)
    assert (out.logits[:, -1] - last_logits(model, ids)).abs().max() < 1e-4  # 0.06 off before
    store.close()


def test_a_cache_of_another_connector_is_refused() -> None:
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    store = make_store(a, None)
    conn_a = TransformersConnector(a, store, plan_loads=False)
    conn_b = TransformersConnector(b, store, plan_loads=False)
    ids = prompt(21, 6)[None]
    with pytest.raises(ValueError, match="another connector"):
        conn_a.prefill(ids, cache=conn_b.new_cache())
    cache, _ = conn_b.prefill(ids)
    assert cache.last_plan.cached_tokens == (0,)  # model A's KV under model B's keys before
    store.close()


def test_the_fingerprint_sees_weights_held_in_buffers() -> None:
    def quantized(seed: int) -> torch.nn.Module:  # GPTQ/AWQ linears keep their weights in buffers
        model = tiny_model()
        lin = model.model.layers[0].self_attn.k_proj
        w = lin.weight.detach().clone() + torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(seed))
        del lin.weight
        lin.register_buffer("weight", w)
        return model

    a, b = quantized(1), quantized(2)
    ids = prompt(9, 1)[None]
    assert not torch.allclose(last_logits(a, ids), last_logits(b, ids))
    assert model_identity(a) != model_identity(b)  # equal before
    plain = tiny_model()
    assert not [n for n, _ in plain.named_buffers() if n in plain.state_dict()]  # no persistent buffers:
    # its digest is computed as it always was (tests/connectors/transformers/test_devices.py checks that)


def test_multimodal_and_embedding_inputs_are_refused() -> None:
    model = tiny_model()
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False)
    ids = prompt(9, 2)[None]
    with pytest.raises(UnsupportedModelError, match="pixel_values"):
        conn.prefill(ids, pixel_values=torch.zeros(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="inputs_embeds"):
        kvtier_generate(model, ids, conn, inputs_embeds=torch.zeros(1, 9, 64), max_new_tokens=1)
    store.close()


def test_a_pad_id_outside_the_vocabulary_is_not_the_gap_filler() -> None:
    model = tiny_model()
    model.config.pad_token_id = VOCAB  # a tokenizer's added pad token; the embeddings never resized
    base = prompt(30, 1)
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False)
    conn.prefill(base[None, :21])
    rows = [base[:26], prompt(13, 5)]
    ids = torch.zeros(2, 26, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 26 - len(r):], mask[i, 26 - len(r):] = r, 1
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = kvtier_generate(model, ids, conn, mask, max_new_tokens=4, do_sample=False, pad_token_id=0)  # IndexError before
    assert torch.equal(got, ref)
    store.close()


def test_an_empty_batch_or_prompt_is_a_clear_error() -> None:
    model = tiny_model()
    store = make_store(model, None)
    conn = TransformersConnector(model, store, plan_loads=False)
    ids = prompt(10, 1)[None]
    for empty in (ids[:0], ids[:, :0]):
        with pytest.raises(ValueError, match="empty"):
            conn.prefill(empty)
    with pytest.raises(ValueError, match="empty batch"):
        kvtier_generate(model, ids[:0], conn, max_new_tokens=1)
    store.close()
