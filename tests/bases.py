"""Local base-model folders of real architectures, randomly initialised, for tests that must not assume the tiny base.

Each folder is what a user points ``model.base`` at: ``config.json``, safetensors weights and a tokenizer saved with
``save_pretrained``. The tokenizers are trained on the sample data and differ the way real ones do:

- ``llama``: BOS added to every text (``<|begin_of_text|>``), EOS ``<|end_of_text|>``, no pad token (Llama 3);
- ``qwen2``: no BOS at all, pad = EOS ``<|endoftext|>`` (Qwen2.5 base);
- ``gpt_neox``: BOS = EOS ``<|endoftext|>``, no pad token (polyglot-ko).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "gpt_neox")

_SPECIALS: dict[str, dict[str, Any]] = {
    "llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None, "add_bos": True},
    "qwen2": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos": False},
    "gpt_neox": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": None, "add_bos": False},
}


def _tokenizer(texts: list[str], arch: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[arch]
    specials = list(dict.fromkeys(t for t in (spec["bos_token"], spec["eos_token"], spec["pad_token"]) if t))
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _config(arch: str, tokenizer: Any, hidden: int = 64, layers: int = 1) -> Any:
    from transformers import AutoConfig

    shape = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
             "num_attention_heads": 4, "max_position_embeddings": 512}
    if arch == "gpt_neox":
        shape.update(rotary_pct=0.5, use_parallel_residual=True)
    else:
        shape.update(num_key_value_heads=2 if arch == "qwen2" else 4, tie_word_embeddings=arch == "qwen2")
    return AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
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
