"""Base models: load a hub id or local directory, or build the offline tiny base once.

The tiny base (``model.base: tiny-ko``) is a few-layer Llama with a byte-level BPE tokenizer trained
with `tokenizers` on the training corpus. It is randomly initialised from ``base.seed``: it answers
badly, which is the point — the adapter has to teach it the domain. Real users set ``model.base`` to
a hub id or a local directory; the same code loads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraops.errors import ModelError
from loraops.config import TINY_BASE, ModelSection, TinyBase
from loraops.paths import BASE_DIR
from loraops.utils import atomic_dir, write_json

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def base_location(cfg: ModelSection, root: Path = Path(".")) -> str:
    """Where the base model lives: the built tiny base's directory, a local path, or a hub id."""
    if cfg.base == TINY_BASE:
        return str(root / BASE_DIR)
    local = root / cfg.base
    return str(local) if local.exists() else cfg.base


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_base(texts: list[str], shape: TinyBase, seed: int, out_dir: Path) -> Path:
    """Build the tiny Llama base and its tokenizer into ``out_dir`` (atomically); deterministic in ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "loraops_base.json", {"kind": TINY_BASE, "seed": seed, "shape": shape.model_dump()})
    return out_dir


def load_tokenizer(location: str, cfg: ModelSection) -> Any:
    """Load the tokenizer, left-padding for batched generation, with a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base: cannot load a tokenizer from {location!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base(location: str, cfg: ModelSection, device: str, dtype: str = "fp32", quantization: str = "none") -> Any:
    """Load the causal LM from a hub id or directory onto ``device``.

    Raises:
        ModelError: when it cannot be found or loaded, or 4-bit is asked for without CUDA.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": torch.bfloat16 if dtype == "bf16" else torch.float32,
        "attn_implementation": "sdpa",
    }
    if quantization == "4bit":
        if device != "cuda":
            raise ModelError("train.quantization=4bit (QLoRA) needs a CUDA GPU with bitsandbytes; set train.quantization=none on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base: cannot load {location!r}: {exc}") from None
    if quantization != "4bit":
        model.to(device)
    return model
