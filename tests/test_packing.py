"""Padding-free packing: per-sequence attention and answer-only logits give the padded loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from loraops import packing
from loraops.model import train_tokenizer
from loraops.train import collator, tokenize_pair

PAIRS = [("질문: 벽지가 들떴어요\n답변: ", "습기 때문입니다."),
         ("질문: 결로는 왜 생기나요? 겨울마다 창가 벽지에 곰팡이가 피어요\n답변: ", "실내외 온도 차로 차가운 벽면에 수증기가 맺히기 때문입니다. 환기하세요."),
         ("질문: 몰딩\n답변: ", "네."),
         ("질문: 타일 줄눈이 갈라졌어요\n답변: ", "줄눈재가 수축했거나 바탕이 움직였기 때문입니다. 갈라진 줄눈을 긁어내고 다시 채웁니다.")]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama with grouped-query attention and a tokenizer trained on the pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer([p + a for p, a in PAIRS] * 3, 400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    items = [tokenize_pair(tok, p, a, 128) for p, a in PAIRS]
    assert len({len(i["input_ids"]) for i in items}) == len(items), "lengths must differ for padding to matter"
    return model, tok, items


def _loss_and_grads(model, batch, answer_only):
    model.zero_grad()
    loss = packing.answer_only_loss(model, batch)[0] if answer_only else model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _variant(model, attn):
    clone = copy.deepcopy(model)
    clone.set_attn_implementation(attn)
    return clone.train()


def test_packed_varlen_answer_only_equals_padded_loss_and_gradients(tiny):
    model, tok, items = tiny
    padded_loss, padded_grads = _loss_and_grads(_variant(model, "sdpa"), collator(tok, packed=False)(items), False)
    packed_batch = collator(tok, packed=True)(items)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    loss, grads = _loss_and_grads(_variant(model, packing.packed_attention("cpu")), packed_batch, True)
    assert loss == pytest.approx(padded_loss, rel=1e-5)
    assert grads.keys() == padded_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_on_a_packed_row_without_boundaries_would_mix_sequences(tiny):
    """The check above can fail: a packed row attended as one sequence gives a different loss (a random
    tiny model attends almost uniformly, so the difference is small, but far above the tolerance)."""
    model, tok, items = tiny
    padded = _variant(model, "sdpa")(**collator(tok, packed=False)(items)).loss.item()
    batch = collator(tok, packed=True)(items)
    mixed = _variant(model, "sdpa")(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert mixed != pytest.approx(padded, rel=1e-5)


def test_answer_only_loss_is_the_model_loss_and_honours_num_items(tiny):
    model, tok, items = tiny
    batch = collator(tok, packed=False)(items)
    full = model(**batch).loss.item()
    mean, outputs = packing.answer_only_loss(model, batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert mean.item() == pytest.approx(full, rel=1e-5) and outputs.logits.shape == (n, len(tok))
    summed, _ = packing.answer_only_loss(model, batch, num_items_in_batch=2 * n)
    assert summed.item() == pytest.approx(full / 2, rel=1e-5)


def test_varlen_attention_is_plain_sdpa_for_padded_batches(tiny):
    """Evaluation and generation with ordinary batches on a model set up for packing are unchanged."""
    model, tok, items = tiny
    batch = collator(tok, packed=False)(items)
    with torch.no_grad():
        expected = _variant(model, "sdpa").eval()(**batch).logits
        got = _variant(model, packing.packed_attention("cpu")).eval()(**batch).logits
    torch.testing.assert_close(got, expected)


def test_packed_attention_picks_flash_attention_only_where_it_runs(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert packing.packed_attention("cuda") == "flash_attention_2"
    assert packing.packed_attention("cpu") == packing.VARLEN_SDPA
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert packing.packed_attention("cuda") == packing.VARLEN_SDPA
