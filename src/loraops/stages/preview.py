"""`loraops prepare --show N`: what the model reads and what it learns, for the first prepared training pairs.

Each pair is rendered as train tokenizes it (the plain template or the base's chat template, ``data.system_prompt``
included) and decoded token by token with special tokens kept; the tokens the loss is computed on (the answer and its
end of turn, or EOS) are marked ``⟦…⟧``. As Axolotl's preprocess debug does, this shows template and EOS mistakes
before a GPU hour is spent on them.
"""

from __future__ import annotations

from pathlib import Path

from loraops.core.config import TINY_BASE, Params
from loraops.core.errors import ModelError
from loraops.core.paths import BASE_DIR, PREPARED_DIR
from loraops.core.readers import load_split
from loraops.modeling import prompting
from loraops.modeling.model import base_location, check_base, load_tokenizer
from loraops.stages.train import tokenize_pair, train_folder

OPEN, CLOSE = "⟦", "⟧"


def marked(tokenizer: object, ids: list[int], labels: list[int]) -> str:
    """The decoded ids with every run of trained tokens (label ≠ -100) inside ``⟦…⟧``."""
    out, run, trained = [], [], None
    for token, label in zip(ids, labels):
        learn = label != -100
        if trained is not None and learn != trained:
            out.append(_piece(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = learn
    if run:
        out.append(_piece(tokenizer, run, bool(trained)))
    return "".join(out)


def _piece(tokenizer: object, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)  # type: ignore[attr-defined]  # a transformers tokenizer
    return f"{OPEN}{text}{CLOSE}" if trained else text


def show(params: Params, root: Path = Path("."), count: int = 3) -> str:
    """The first ``count`` training pairs as the model sees them, with the trained tokens marked.

    Raises:
        ModelError: the tiny base, which train builds, is not built yet; or the base cannot be loaded.
        ConfigError: a chat template or system prompt that does not work with this base.
    """
    if params.model.base == TINY_BASE and not (root / BASE_DIR / "tokenizer.json").exists():
        raise ModelError("--show: the tiny base (model.base: tiny-ko) is built by the train stage from the training "
                         "split; run `loraops train` once, or point model.base at your base")
    location = check_base(params.model, root) if params.model.base != TINY_BASE else base_location(params.model, root)
    tokenizer = load_tokenizer(location, params.model)
    fmt = prompting.resolve(params.data.chat_template, params.data.system_prompt, tokenizer, root)
    folder = train_folder(params) if (root / train_folder(params) / "train.jsonl").exists() else PREPARED_DIR
    rows = load_split("train", root, folder)[:count]
    lines = [f"prompt format: {fmt.describe}; trained tokens are marked {OPEN}…{CLOSE}"]
    for number, row in enumerate(rows, start=1):
        item = tokenize_pair(tokenizer, row["prompt"], row["answer"], params.model.max_length, fmt)
        learned = sum(label != -100 for label in item["labels"])
        lines += ["", f"── {number}/{len(rows)} · {row['id']} · {len(item['input_ids'])} tokens, {learned} trained",
                  marked(tokenizer, item["input_ids"], item["labels"])]
    return "\n".join(lines)
