"""Local base-model folders of real architectures, randomly initialised, for tests that must not assume the tiny base.

Each folder is what a user points ``model.base`` at: ``config.json``, safetensors weights and a tokenizer saved with
``save_pretrained``. The tokenizers are trained on the sample data and differ the way real ones do:

- ``llama``: BOS added to every text (``<|begin_of_text|>``), EOS ``<|end_of_text|>``, no pad token (Llama 3);
- ``qwen2``: no BOS at all, pad = EOS ``<|endoftext|>`` (Qwen2.5 base);
- ``gpt_neox``: BOS = EOS ``<|endoftext|>``, no pad token (polyglot-ko).

And instruct bases with chat templates written for these tests after the public formats:

- ``llama_instruct``: Llama-3 style, BOS in the template, header blocks, end of turn ``<|eot_id|>`` ≠ EOS, no pad;
- ``qwen2_instruct``: Qwen2 ChatML, no BOS, a default system turn, EOS = end of turn ``<|im_end|>``, pad
  ``<|endoftext|>`` ≠ EOS;
- ``gemma2``: Gemma-2 style (sliding-window and soft-capped attention), no system role, ``<end_of_turn>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "gpt_neox")
INSTRUCT = ("llama_instruct", "qwen2_instruct", "gemma2")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

_SPECIALS: dict[str, dict[str, Any]] = {
    "llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None, "add_bos": True},
    "qwen2": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos": False},
    "gpt_neox": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": None, "add_bos": False},
    "llama_instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None,
                       "add_bos": True, "chat": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                       "template": LLAMA3_TEMPLATE},
    "qwen2_instruct": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos": False,
                       "chat": ["<|im_start|>"], "template": CHATML_TEMPLATE},
    "gemma2": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos": True,
               "chat": ["<start_of_turn>", "<end_of_turn>"], "template": GEMMA_TEMPLATE},
}
_ARCH = {"llama_instruct": "llama", "qwen2_instruct": "qwen2", "gemma2": "gemma2"}


def _tokenizer(texts: list[str], arch: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[arch]
    chat = spec.get("chat", [])
    specials = list(dict.fromkeys(t for t in (spec["bos_token"], spec["eos_token"], spec["pad_token"], *chat) if t))
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if spec["add_bos"]:
        bos = spec["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec[k]}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": chat})
        tokenizer.chat_template = spec["template"]
    return tokenizer


def _config(arch: str, tokenizer: Any, hidden: int = 64, layers: int = 1) -> Any:
    from transformers import AutoConfig

    shape = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": 4, "max_position_embeddings": 512}
    model_type = _ARCH.get(arch, arch)
    if model_type == "gpt_neox":
        shape.update(rotary_pct=0.5, use_parallel_residual=True)
    elif model_type == "gemma2":  # every other layer a sliding window; soft-capped attention and logits
        shape.update(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, sliding_window=32,
                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    else:
        shape.update(num_key_value_heads=2 if model_type == "qwen2" else 4, tie_word_embeddings=model_type == "qwen2")
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)


def build_base(arch: str, texts: list[str], out: Path, vocab_size: int = 800, seed: int = 0) -> Path:
    """Save a randomly initialised ``arch`` model and its tokenizer (trained on ``texts``) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(texts, arch, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def sample_texts(root: Path) -> list[str]:
    """Questions and answers of the sample data (the wide CSV), for training the test tokenizers."""
    import pandas as pd

    frame = pd.read_csv(root / "data/raw/interior_qa.csv")
    return [str(v) for column in frame.columns if column.startswith(("질문", "답변")) for v in frame[column].dropna()]
