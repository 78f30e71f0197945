"""Stage `prepare`: raw file → cleaned QA pairs → grouped, stratified split → prompts.

Outputs ``data/prepared/{train,validation,test}.jsonl`` and ``data/prepared/card.json``.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from loraops.core.config import DataSection, Params
from loraops.core.paths import DATA_CARD, PREPARED_DIR, SPLITS, split
from loraops.core.readers import DataError, QARecord, read_records
from loraops.core.results import DataCard, LengthStats, write_result
from loraops.core.text import clean_text, fill, template_fields
from loraops.core.utils import atomic_dir, jsonl_line


def clean(records: list[QARecord], cfg: DataSection) -> tuple[list[QARecord], dict[str, int]]:
    """Normalise, drop exact duplicates and apply the length policy; return records and what was done."""
    report = Counter(duplicates=0, truncated=0, dropped_long=0, longest_question=0, longest_answer=0)
    seen: set[tuple[str, str, str]] = set()
    out = []
    for rec in records:
        question, answer = clean_text(rec.question), clean_text(rec.answer)
        key = (rec.group, question, answer)
        if key in seen:
            report["duplicates"] += 1
            continue
        seen.add(key)
        report["longest_question"] = max(report["longest_question"], len(question))
        report["longest_answer"] = max(report["longest_answer"], len(answer))
        too_long = len(question) > cfg.max_question_chars or len(answer) > cfg.max_answer_chars
        if too_long and cfg.length_policy == "drop":
            report["dropped_long"] += 1
            continue
        if too_long:
            report["truncated"] += 1
            question, answer = cut_at_word(question, cfg.max_question_chars), cut_at_word(answer, cfg.max_answer_chars)
        attrs = {k: clean_text(v) for k, v in rec.attributes.items()}
        out.append(replace(rec, question=question, answer=answer, category=clean_text(rec.category), attributes=attrs))
    if not out:
        raise DataError(f"data.path: no pairs left after cleaning (length policy {cfg.length_policy!r} dropped {report['dropped_long']})")
    return out, dict(report)


def cut_at_word(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last sentence end or space in its final fifth (never
    mid-word unless one word fills it)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    floor = int(limit * 0.8)
    for marks in ((".", "?", "!", "。", "\n"), (" ",)):
        at = max(head.rfind(mark) for mark in marks)
        if at >= floor:
            return head[: at + 1].rstrip()
    return head


def length_note(report: dict[str, int], cfg: DataSection) -> str | None:
    """What the length policy did, naming its keys (one line), or None when nothing was too long."""
    if report.get("truncated"):
        return (f"{report['truncated']} pair(s) were cut to data.max_question_chars={cfg.max_question_chars} / "
                f"data.max_answer_chars={cfg.max_answer_chars} at a word boundary (longest answer "
                f"{report['longest_answer']:,} characters); raise them or set data.length_policy=drop")
    if report.get("dropped_long"):
        return (f"{report['dropped_long']} pair(s) longer than data.max_question_chars={cfg.max_question_chars} / "
                f"data.max_answer_chars={cfg.max_answer_chars} were dropped (data.length_policy=drop)")
    return None


def split_groups(records: list[QARecord], cfg: DataSection, seed: int) -> dict[str, list[QARecord]]:
    """Split by source row (``group``), stratified by category, deterministic from ``seed``.

    Every pair of a group lands in the same split, so paraphrases never cross splits. In each category
    the groups are shuffled and cut by the configured fractions; a category with at least three groups
    gives at least one to test.
    """
    by_category: dict[str, list[str]] = defaultdict(list)
    for group, category in dict((r.group, r.category) for r in records).items():
        by_category[category].append(group)
    assignment: dict[str, str] = {}
    rng = random.Random(seed)
    for category in sorted(by_category):
        groups = sorted(by_category[category])
        rng.shuffle(groups)
        n = len(groups)
        n_test = round(n * cfg.test_fraction) or (1 if n >= 3 else 0)
        n_val = round(n * cfg.validation_fraction) or (1 if n >= 4 and cfg.validation_fraction > 0 else 0)
        for index, group in enumerate(groups):
            assignment[group] = "test" if index < n_test else "validation" if index < n_test + n_val else "train"
    splits: dict[str, list[QARecord]] = {name: [] for name in SPLITS}
    for rec in records:
        splits[assignment[rec.group]].append(rec)
    for name in ("train", "test"):
        if not splits[name]:
            raise DataError(f"data: the {name} split is empty ({len(assignment)} source rows); add data or change data.test_fraction")
    return splits


def render(rec: QARecord, template: str) -> str:
    """Fill the prompt template with the question, category and attribute fields.

    Raises:
        DataError: when the template names a field the record does not have.
    """
    return fill(template, {"question": rec.question, "category": rec.category, **rec.attributes}, "data.template")


def require_template_fields(records: list[QARecord], template: str, path: Path) -> None:
    """Every attribute the prompt template uses must have a value in every row.

    Raises:
        DataError: the first row with an empty one, naming the file, the row and the column.
    """
    used = [name for name in template_fields(template) if name not in ("question", "category", "context")]
    for rec in records:
        for name in used:
            if not str(rec.attributes.get(name, "")).strip():
                raise DataError(f"{path}: {rec.source} (id {rec.group}): no {name!r}, which the prompt template uses "
                                f"({{{name}}}); fill it in or drop the row")


def _length_stats(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def build_card(splits: dict[str, list[QARecord]], report: dict[str, int], source: dict[str, Any]) -> DataCard:
    """The data card: counts per split and category, length statistics, what cleaning removed."""
    every = [rec for name in SPLITS for rec in splits[name]]
    return DataCard(
        source=source,
        pairs={name: len(splits[name]) for name in SPLITS},
        groups={name: len({r.group for r in splits[name]}) for name in SPLITS},
        categories={name: dict(sorted(Counter(r.category for r in splits[name]).items())) for name in SPLITS},
        question_chars=LengthStats.model_validate(_length_stats([len(r.question) for r in every])),
        answer_chars=LengthStats.model_validate(_length_stats([len(r.answer) for r in every])),
        cleaning=report,
    )


def build_splits(records: list[QARecord], cfg: DataSection, seed: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Pure stage logic: clean, split and render; return the rows per split and the cleaning report."""
    cleaned, report = clean(records, cfg)
    splits = split_groups(cleaned, cfg, seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in SPLITS:
        rows[name] = []
        for index, rec in enumerate(sorted(splits[name], key=lambda r: (r.group, r.question, r.answer))):
            row = {"id": f"{name}-{index:05d}", **asdict(rec), "prompt": render(rec, cfg.template)}
            rows[name].append(row)
    return rows, {"splits": splits, "report": report}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run(params: Params, root: Path = Path(".")) -> DataCard:
    """Read ``data.path``, prepare it and write ``data/prepared`` atomically; return the card."""
    path = root / params.data.path if not Path(params.data.path).is_absolute() else Path(params.data.path)
    records, encoding = read_records(path, params.data)
    require_template_fields(records, params.data.template, path)
    rows, extra = build_splits(records, params.data, params.base.seed)
    source = {"path": params.data.path, "format": params.data.format, "encoding": encoding, "md5": _md5(path),
              "records_read": len(records)}
    card = build_card(extra["splits"], extra["report"], source)
    with atomic_dir(root / PREPARED_DIR) as tmp:
        for name in SPLITS:
            with (tmp / split(name).name).open("w", encoding="utf-8") as fh:
                for row in rows[name]:
                    fh.write(jsonl_line(row))
        write_result(card, tmp / DATA_CARD.name)
    return card
