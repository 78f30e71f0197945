"""Real model shapes, randomly initialised, for throughput figures without downloading weights.

Throughput depends on a model's shape (layers, widths, heads, vocabulary), not on its weights, so the GPU
figures use the published configurations of small Llama/Qwen models built here with random weights. The
tokenizer is the one the tiny base learns from the sample data: its ids are valid in every vocabulary
below, and the LM head and embeddings still have the real vocabulary's size. Sequences are longer in
tokens than with the model's own tokenizer, so compare tokens/s, not samples/s, with published figures.

    python benchmarks/train_throughput.py --arch qwen2.5-0.5b --quantization 4bit
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_QWEN = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
         "vocab_size": 151_936, "tie_word_embeddings": True, "max_position_embeddings": 32_768}

# Published config.json values (hub ids in comments); parameter counts are what `parameters` returns.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,  # Qwen/Qwen2.5-0.5B
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen2.5-1.5b": {**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,  # Qwen/Qwen2.5-1.5B
                     "num_attention_heads": 12, "num_key_value_heads": 2},
    "llama-3.2-1b": {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,  # meta-llama/Llama-3.2-1B
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128_256, "tie_word_embeddings": True,
                     "max_position_embeddings": 131_072, "rope_theta": 500_000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


def config(name: str, tokenizer: Any = None) -> Any:
    """The transformers config for ``name``, with the special token ids of ``tokenizer`` when given.

    Raises:
        KeyError: for a name not in :data:`ARCHITECTURES` (the message lists the known ones).
    """
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    values = dict(ARCHITECTURES[name])
    if tokenizer is not None:
        values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def parameters(name: str) -> int:
    """Parameter count of ``name`` (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(name))
    return sum(p.numel() for p in model.parameters())


def build(name: str, tokenizer_dir: Path, out: Path, device: str) -> str:
    """Save ``name`` with random bf16 weights and the tokenizer from ``tokenizer_dir`` into ``out``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_random(config(name, tokenizer), tokenizer, out, device)


def save_random(model_config: Any, tokenizer: Any, out: Path, device: str) -> str:
    """Save a model of ``model_config`` with random bf16 weights (seed 0) and ``tokenizer`` into ``out``.

    Initialised on ``device`` (seconds on a GPU rather than minutes on CPU), then saved for the arms.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
