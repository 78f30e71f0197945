"""Base models: load a hub id or local directory, or build the offline tiny base once.

The tiny base (``model.base: tiny-ko``) is a few-layer Llama with a byte-level BPE tokenizer trained
with `tokenizers` on the training corpus. It is randomly initialised from ``base.seed``: it answers
badly, which is the point — the adapter has to teach it the domain. Real users set ``model.base`` to
a hub id or a local directory; the same code loads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraops.core.config import TINY_BASE, ModelSection, TinyBase
from loraops.core.errors import ModelError
from loraops.core.paths import BASE_DIR
from loraops.core.utils import atomic_dir, sha256_dir, write_json

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BASE_CARD = "loraops_base.json"
"""In ``models/base``: what the base was. The tiny base's folder holds its weights too; for any other base the
folder holds only this card (hub id or folder, revision, a content hash), so the train stage's DVC output exists
for every base and evaluate reruns when the base changes."""
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def base_location(cfg: ModelSection, root: Path = Path(".")) -> str:
    """Where the base model lives: the built tiny base's directory, a local path, or a hub id."""
    if cfg.base == TINY_BASE:
        return str(root / BASE_DIR)
    local = root / cfg.base
    return str(local) if local.exists() else cfg.base


def check_base(cfg: ModelSection, root: Path = Path(".")) -> str:
    """Before any stage runs: can ``model.base`` be loaded? Reads only its config and file list (no weights).

    Returns the base's location (see :func:`base_location`).

    Raises:
        ModelError: naming ``model.base`` and why: a folder without ``config.json`` or weights, an unknown
            architecture, or a hub id that is neither in the local Hugging Face cache nor reachable.
    """
    location = base_location(cfg, root)
    if cfg.base == TINY_BASE:
        return location
    path = Path(location)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.base: {cfg.base!r} is a folder without config.json; point it at a folder saved "
                             "with save_pretrained (config.json, weights, tokenizer)")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            raise ModelError(f"model.base: {cfg.base!r} has no weights (no {', '.join(WEIGHT_PATTERNS)} files)")
    elif Path(cfg.base).is_absolute() or cfg.base.startswith((".", "~")) or cfg.base.count("/") > 1:
        raise ModelError(f"model.base: {cfg.base!r} is not a folder here and not a hub id (owner/name)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        why = str(exc).strip().splitlines()[0][:300]
        offline = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache is searched)" \
            if _offline() and not path.is_dir() else ""
        raise ModelError(f"model.base: cannot load {cfg.base!r}{offline}: {why}") from None
    return location


def base_config(location: str, cfg: ModelSection) -> Any:
    """The base's ``config.json`` as transformers reads it (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def write_base_card(cfg: ModelSection, location: str, out_dir: Path) -> Path:
    """For a hub or local base: ``models/base`` holds only :data:`BASE_CARD`, naming the base and its content.

    A local folder is identified by the hash of its weights and tokenizer files; a hub id by the commit the
    local Hugging Face cache resolved (the revision as configured when it cannot be resolved).
    """
    path = Path(location)
    card: dict[str, object] = {"kind": "reference", "base": cfg.base, "revision": cfg.revision}
    if path.is_dir():
        card["location"] = str(path.resolve())
        weights = next((pattern for pattern in WEIGHT_PATTERNS if next(path.glob(pattern), None)), "*.safetensors")
        card["weights_sha256"] = sha256_dir(path, weights)
        card["tokenizer_sha256"] = sha256_dir(path, "tokenizer*")
    else:
        card["commit"] = _hub_commit(cfg)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / BASE_CARD, card)
    return out_dir


def _hub_commit(cfg: ModelSection) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.base, revision=cfg.revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached as a snapshot (or an older cache layout): the revision stands in
        return None


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
    # transformers writes only on global rank 0 when torch.distributed is up; the first process of every node builds
    # the base into that node's own folder (nodes share no disk), so this copy is written wherever it is built
    model.should_save_on_this_rank = lambda is_main_process: True
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
        try:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except ValueError as exc:
            if "attention implementation" not in str(exc):
                raise
            # SDPA is not wired for this architecture in transformers (e.g. Gemma 2's soft-capped scores): eager
            model = AutoModelForCausalLM.from_pretrained(location, **{**kwargs, "attn_implementation": "eager"})
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.base: cannot load {location!r}: {exc}") from None
    if quantization != "4bit":
        model.to(device)
    return model
