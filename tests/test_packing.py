"""Padding-free packing: per-sequence attention and answer-only logits give the padded loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from loraops.modeling import packing
from loraops.modeling.model import train_tokenizer
from loraops.stages.train import collator, tokenize_pair

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


def _reference_varlen(with_gqa_and_scale: bool):
    """A reference for PyTorch's CUDA-only ``varlen_attn`` (per-sequence causal SDPA in its (T, heads, dim)
    layout), with either release's parameters, so the glue around the kernel is checked on CPU."""
    import torch.nn.functional as F

    calls = []

    def check(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, is_causal=None, enable_gqa=False, scale=None):
        assert cu_q.dtype == torch.int32 and (window_size == (-1, 0) or is_causal is True)
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        calls.append(k.shape[1])
        bounds = cu_q.tolist()
        out = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                              is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
               for s, e in zip(bounds, bounds[1:])]
        return torch.cat(out)

    if with_gqa_and_scale:
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
            return check(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, enable_gqa=enable_gqa, scale=scale)
    else:  # torch 2.10: is_causal, no scale, no grouped-query attention
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
            assert k.shape[1] == q.shape[1], "keys must be repeated for a kernel without enable_gqa"
            return check(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)
    return varlen_attn, calls


@pytest.mark.parametrize("newer_release", [True, False])
def test_cuda_varlen_kernel_glue_gives_the_padded_loss_and_gradients(tiny, monkeypatch, newer_release):
    """On CUDA in bf16 a packed row goes to PyTorch's varlen FlashAttention in one call per layer; here a
    reference kernel stands in for it (the kernel itself runs in the gpu tier)."""
    import inspect

    model, tok, items = tiny
    kernel, calls = _reference_varlen(newer_release)
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: (kernel, frozenset(inspect.signature(kernel).parameters)))
    monkeypatch.setattr(packing, "_kernel_runs", lambda query: True)
    padded_loss, padded_grads = _loss_and_grads(_variant(model, "sdpa"), collator(tok, packed=False)(items), False)
    loss, grads = _loss_and_grads(_variant(model, packing.packed_attention("cpu")), collator(tok, packed=True)(items), True)
    heads = model.config.num_key_value_heads if newer_release else model.config.num_attention_heads
    assert calls == [heads] * model.config.num_hidden_layers  # one call per layer, keys grouped or repeated
    assert loss == pytest.approx(padded_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_kernel_is_used_only_where_it_runs(monkeypatch):
    query = torch.zeros(1, 2, 3, 4)
    assert not packing._kernel_runs(query) and not packing._kernel_runs(query.bfloat16())  # CPU: per-sequence SDPA

    def older(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False): ...

    def newer(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)): ...

    monkeypatch.setattr(packing, "_kernel_runs", lambda query: True)
    for kernel, accepted in ((older, frozenset()), (newer, frozenset({"scale"}))):
        monkeypatch.setattr(packing, "_varlen_kernel", lambda kernel=kernel, accepted=accepted: (kernel, accepted))
        assert packing._torch_varlen(query, None, 0.0)[0] is kernel
        assert packing._torch_varlen(query, 0.5, 0.0)[0] is kernel  # 0.5 = 1/sqrt(head_dim 4), the default
        assert packing._torch_varlen(query, None, 0.1) is None  # attention dropout: per-sequence SDPA
        custom_scale = packing._torch_varlen(query, 0.3, 0.0)  # only a kernel with a `scale` argument takes it
        assert (custom_scale is not None) == (kernel is newer)


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_padded_sdpa(tiny):
    """The real kernel on a GPU: packed bf16 loss equals the padded bf16 loss within bf16 rounding."""
    if not torch.cuda.is_available() or packing._varlen_kernel() is None:
        pytest.skip("needs a CUDA GPU and torch.nn.attention.varlen")
    model, tok, items = tiny
    cuda = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    padded = _variant(model, "sdpa").cuda().bfloat16()
    packed = _variant(model, packing.packed_attention("cuda")).cuda().bfloat16()
    with torch.no_grad():
        expected = padded(**cuda(collator(tok, packed=False)(items))).loss.item()
        got = packing.answer_only_loss(packed, cuda(collator(tok, packed=True)(items)))[0].item()
    assert got == pytest.approx(expected, rel=2e-2)


def test_packed_rows_refuse_attention_they_would_get_wrong():
    """A sliding window shorter than a sequence (Mistral, Gemma) or soft-capped scores (Gemma 2) are not
    what causal SDPA per sequence computes; a window longer than every sequence changes nothing."""
    from types import SimpleNamespace

    module, q, cu = SimpleNamespace(training=True), torch.randn(1, 2, 6, 4), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="3-token sliding window, shorter than a 4-token sequence.*batching=padded"):
        packing.varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=cu, sliding_window=3)
    with pytest.raises(ValueError, match="soft-capped"):
        packing.varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=cu, softcap=50.0)
    windowed = packing.varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=cu, sliding_window=4)[0]
    torch.testing.assert_close(windowed, packing.varlen_sdpa_attention(module, q, q, q, None, cu_seq_lens_q=cu)[0])


def test_a_sliding_window_model_is_refused_on_packed_rows_and_trains_padded(tiny):
    """A real Mistral passes its window to the attention function; a window shorter than a sequence is refused."""
    from transformers import MistralConfig, MistralForCausalLM

    from loraops.core.config import ConfigError

    _, tok, items = tiny
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4, pad_token_id=tok.pad_token_id)
    model = MistralForCausalLM(config)
    model.set_attn_implementation(packing.packed_attention("cpu"))
    with pytest.raises(ConfigError, match="4-token sliding window.*train.batching=padded"):
        packing.answer_only_loss(model, collator(tok, packed=True)(items))
    assert torch.isfinite(packing.answer_only_loss(model, collator(tok, packed=False)(items))[0])
