"""One generation path: batched greedy answers in the adapter's prompt format, cut at the stop strings, and the base
with its adapter attached. Evaluate, the registered model and the exports answer through it; ``loraops serve`` decodes
token by token (``serving.api``) but cuts its answers with the same :func:`clean_answer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraops.core.config import EvalSection, Params
from loraops.core.utils import progress_lines, say
from loraops.modeling.model import ModelError, base_location, load_base, load_tokenizer
from loraops.modeling.prompting import PromptFormat


def clean_answer(text: str, stop_strings: list[str]) -> str:
    """Cut a generated continuation at the first stop string and strip it."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def generate(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalSection, device: str,
             progress: bool = True, label: str = "generate", fmt: PromptFormat | None = None) -> list[str]:
    """Greedy answers for ``prompts`` (filled templates) in the prompt format ``fmt`` (plain by default), batched over
    length-sorted, left-padded prompts; input order kept. Generation stops on the format's stop tokens.

    Each distinct prompt is generated once (a wide-format question has several reference answers).
    """
    import torch
    from tqdm.auto import tqdm

    unique = sorted(set(prompts), key=lambda p: (len(p), p))
    answers: dict[str, str] = {}
    fmt = fmt or PromptFormat()
    stops = fmt.eos_argument(tokenizer, model)
    model.eval()
    batches = [unique[i: i + cfg.batch_size] for i in range(0, len(unique), cfg.batch_size)]
    lines = progress and progress_lines()
    for number, batch in enumerate(tqdm(batches, desc=label, disable=not progress or lines, leave=False), start=1):
        if lines:
            say(f"{label}: batch {number}/{len(batches)} ({min(number * cfg.batch_size, len(unique))}/{len(unique)} questions)")
        texts = [fmt.text(tokenizer, prompt) for prompt in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        for prompt, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[prompt] = clean_answer(text, cfg.stop_strings)
    return [answers[prompt] for prompt in prompts]


def load_tuned(params: Params, adapter_dir: Path, device: str, root: Path = Path(".")) -> tuple[Any, Any]:
    """Base model with the adapter attached, and the tokenizer saved with the adapter.

    Raises:
        ModelError: when the adapter has not been trained.
    """
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: no adapter; run `loraops train` (or `dvc repro train`) first")
    dtype = "bf16" if device == "cuda" and params.train.precision in ("auto", "bf16") else "fp32"
    base = load_base(base_location(params.model, root), params.model, device, dtype=dtype)
    tokenizer = load_tokenizer(str(adapter_dir), params.model)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device), tokenizer
