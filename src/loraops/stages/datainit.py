"""`loraops init-data`: a params file for a new dataset, its format and columns guessed from the file.

Per-dataset params files (``loraops run --params configs/<name>.yaml``) keep several datasets apart: each
is complete, so switching datasets never inherits the previous one's column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraops.core.config import DataSection, Params, validate
from loraops.core.errors import ConfigError, DataError
from loraops.core.readers import SUFFIXES, read_records, read_rows

CHARS_PER_TOKEN = 2.0
"""A rough figure for Korean text in a multilingual tokenizer, used only to propose token limits; `loraops train` says
how many pairs ``model.max_length`` really cuts, and `evaluate` how many references ``eval.max_new_tokens`` does."""

QUESTION_NAMES = ("question", "질문", "q", "query", "prompt", "instruction", "input", "user", "문의", "질의")
ANSWER_NAMES = ("answer", "답변", "a", "response", "output", "completion", "reply", "assistant", "응답", "정답")
CATEGORY_NAMES = ("category", "카테고리", "분류", "type", "유형", "topic", "주제", "label")
ID_NAMES = ("id", "group", "qid", "번호")


def _pick(header: list[str], names: tuple[str, ...], exclude: tuple[str | None, ...] = ()) -> str | None:
    lowered = {column.strip().lower(): column for column in header if column not in exclude}
    for name in names:
        if name in lowered:
            return lowered[name]
    for name in names:  # a column that contains the name, e.g. "customer_question"
        for low, column in lowered.items():
            if len(name) > 1 and name in low:
                return column
    return None


def guess(path: Path) -> dict[str, Any]:
    """The ``data`` section values for ``path``: format, columns and prefixes that the readers need.

    Raises:
        DataError: the file cannot be read, or no question/answer columns can be told apart.
    """
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(sorted(SUFFIXES))}")
    header, rows, _, _ = read_rows(path, DataSection(category_column=None))
    if not rows:
        raise DataError(f"{path}: no rows")
    out: dict[str, Any] = {"path": str(path)}
    if "messages" in header:
        return out | {"format": "chat", "category_column": _pick(header, CATEGORY_NAMES)}
    if "instruction" in header and "output" in header:
        return out | {"format": "alpaca", "category_column": _pick(header, CATEGORY_NAMES)}
    for q_prefix, a_prefix in (("질문_", "답변_"), ("question_", "answer_"), ("q", "a")):
        questions = [c for c in header if c.startswith(q_prefix) and c[len(q_prefix):].isdigit()]
        answers = [c for c in header if c.startswith(a_prefix) and c[len(a_prefix):].isdigit()]
        if questions and answers:
            return out | {"format": "wide", "question_prefix": q_prefix, "answer_prefix": a_prefix,
                          "id_column": _pick(header, ID_NAMES) or "id", "category_column": _pick(header, CATEGORY_NAMES)}
    # the id first: "문의번호" (inquiry number) names an id although it contains "문의" (inquiry)
    ids = _pick(header, ID_NAMES)
    ids = ids if ids and _looks_like_ids([r.get(ids, "") for _, r in rows]) else None
    question = _pick(header, QUESTION_NAMES, (ids,))
    answer = _pick(header, ANSWER_NAMES, (ids, question))
    if not question or not answer or question == answer:
        raise DataError(f"{path}: cannot tell the question and answer columns apart among {', '.join(header)}; "
                        "write the params file by hand (data.question_column, data.answer_column)")
    return out | {"format": "qa", "question_column": question, "answer_column": answer,
                  "id_column": ids, "category_column": _pick(header, CATEGORY_NAMES, (ids, question, answer))}


def _looks_like_ids(values: list[str]) -> bool:
    """Short codes (numbers, "T-0012"), not sentences."""
    filled = [v.strip() for v in values if v and v.strip()]
    return bool(filled) and all(len(v) <= 32 and " " not in v for v in filled)


def _round_up(value: float, step: int) -> int:
    return int(-(-value // step) * step)


def lengths(data: Path, section: DataSection) -> dict[str, Any]:
    """Length settings proposed from the file's question and answer length percentiles (characters): the data
    limits cut at most 1% of the rows, the token limits hold the 95th percentile pair and the 90th percentile answer."""
    import numpy as np

    records, _ = read_records(data, section)
    questions = np.array([len(r.question) for r in records] or [0])
    answers = np.array([len(r.answer) for r in records] or [0])
    q95, a95 = float(np.percentile(questions, 95)), float(np.percentile(answers, 95))
    return {
        "data.max_question_chars": max(128, _round_up(float(np.percentile(questions, 99)), 64)),
        "data.max_answer_chars": max(256, _round_up(float(np.percentile(answers, 99)), 128)),
        "model.max_length": max(128, min(8192, _round_up((q95 + a95) / CHARS_PER_TOKEN + 32, 64))),
        "eval.max_new_tokens": max(32, min(2048, _round_up(float(np.percentile(answers, 90)) / CHARS_PER_TOKEN, 32))),
        "percentiles": {"question_chars_p50_p95_max": [float(np.percentile(questions, 50)), q95, float(questions.max())],
                        "answer_chars_p50_p95_max": [float(np.percentile(answers, 50)), a95, float(answers.max())]},
    }


def write_params_for(data: Path, target: Path, current: Params, model_name: str | None,
                     force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write ``target``: the current params with the data section guessed for ``data`` and its own model name.

    Raises:
        ConfigError: ``target`` exists and ``force`` is off.
    """
    if not data.exists():
        raise DataError(f"{data}: not found")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it or --out to write elsewhere")
    guessed = guess(data)
    try:
        guessed["path"] = str(data.resolve().relative_to(Path.cwd()))
    except ValueError:
        guessed["path"] = str(data.resolve())
    tree = current.model_dump(mode="json")
    tree["data"].update(guessed)
    tree["data"]["attribute_columns"] = []
    if guessed["format"] != "wide":
        tree["data"]["template"] = DataSection().template
    tree["registry"]["model_name"] = model_name or f"{data.stem}-lora"
    # The sample's interior documents are not this dataset's: retrieval indexes its own training answers until
    # rag.docs_path points at its documents (and rag.corpus is docs again).
    tree["rag"].update(corpus="train", docs_path=guessed["path"])
    tree["augment"]["documents"] = False
    proposed = lengths(data, DataSection(**{k: v for k, v in tree["data"].items() if k != "path"}))
    for key, value in proposed.items():
        if key != "percentiles":
            section, name = key.split(".")
            tree[section][name] = value
    params = validate(tree)  # the file written always loads
    target.parent.mkdir(parents=True, exist_ok=True)
    header = f"# params for {guessed['path']} (written by `loraops init-data`; review the data section)\n"
    target.write_text(header + yaml.safe_dump(params.model_dump(mode="json"), allow_unicode=True, sort_keys=False),
                      encoding="utf-8")
    shown = {f"data.{k}": v for k, v in guessed.items()} | {"registry.model_name": tree["registry"]["model_name"]}
    pct = proposed.pop("percentiles")
    shown["lengths (characters p50 / p95 / max)"] = (f"questions {' / '.join(f'{v:,.0f}' for v in pct['question_chars_p50_p95_max'])}"
                                                   f", answers {' / '.join(f'{v:,.0f}' for v in pct['answer_chars_p50_p95_max'])}")
    shown |= proposed | {"rag.corpus": "train (its own answers; set rag.docs_path to your documents and rag.corpus: docs)"}
    return target, shown
