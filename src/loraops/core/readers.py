"""Readers for each input format, each turning a file into QA records.

A record is one (question, answer) pair with the source row it came from (``group``), so paraphrases
of one source row stay together when the data is split. Every rejection names the file and the row,
line or column.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraops.core.config import DataSection
from loraops.core.errors import DataError
from loraops.core.paths import AUGMENTED_DIR, PREPARED_DIR, split
from loraops.core.utils import jsonl_lines

_TEXT_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json"}
SUFFIXES = _TEXT_SUFFIXES | {".parquet"}


@dataclass(frozen=True)
class QARecord:
    """One question-answer pair and where it came from."""

    group: str
    question: str
    answer: str
    category: str
    source: str
    attributes: dict[str, str] = field(default_factory=dict)


def decode(path: Path, raw: bytes, encoding: str) -> tuple[str, str]:
    """Decode file bytes, returning ``(text, encoding_used)``.

    With ``encoding='auto'``, UTF-8 (BOM stripped) is tried first, then CP949 — the superset of
    EUC-KR that legacy Korean spreadsheets export.

    Raises:
        DataError: on an empty or binary file, or text in no known encoding.
    """
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not {path.suffix or 'text'} data")
    if encoding != "auto":
        try:
            return raw.decode(encoding).lstrip("\ufeff"), encoding
        except LookupError:
            raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid {encoding} at byte {exc.start}; check data.encoding") from None
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        utf8_error = exc.start
    try:
        text = raw.decode("cp949")
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not UTF-8 (invalid byte at offset {utf8_error}) nor CP949/EUC-KR; "
            "set data.encoding to the file's encoding"
        ) from None
    if not any("\uac00" <= ch <= "\ud7a3" for ch in text):
        raise DataError(f"{path}: not UTF-8 (invalid byte at offset {utf8_error}); set data.encoding to the file's encoding")
    return text, "cp949"


def _rows_csv(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in (reader.fieldnames or [])]
    if not header:
        raise DataError(f"{path}: no header row")
    reader.fieldnames = header
    rows = []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}: line {reader.line_num}: more fields than the {len(header)} header columns")
            rows.append((reader.line_num, {k: (v or "") for k, v in row.items()}))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from None
    return header, rows


def _rows_jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    return rows


def _rows_json(path: Path, text: str) -> list[tuple[int, Any]]:
    if path.suffix == ".jsonl":
        return _rows_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(index, item) for index, item in enumerate(data, start=1)]


def read_rows(path: Path, cfg: DataSection) -> tuple[list[str], list[tuple[int, dict[str, str]]], str, str]:
    """Read a tabular file (CSV/TSV, JSONL of objects, Parquet) → header, (row number, row), unit, encoding."""
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
        frame = frame.fillna("").astype(str)
        return list(frame.columns), [(i, row) for i, row in enumerate(frame.to_dict("records"), start=1)], "row", "binary"
    text, used = decode(path, path.read_bytes(), cfg.encoding)
    if path.suffix in {".jsonl", ".json"}:
        items = _rows_json(path, text)
        rows = []
        for number, item in items:
            if not isinstance(item, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(item).__name__}")
            rows.append((number, {k: "" if v is None else str(v) for k, v in item.items()}))
        header = sorted({key for _, row in rows for key in row})
        return header, rows, "line", used
    return (*_rows_csv(path, text), "line", used)


def _require(path: Path, header: list[str], needed: list[str]) -> None:
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}")


def _category(row: dict[str, str], cfg: DataSection, header: list[str]) -> str:
    if cfg.category_column:
        return row.get(cfg.category_column, "").strip() or "unknown"
    return "all"


def _require_category(path: Path, cfg: DataSection, keys: list[str] | set[str]) -> None:
    """A configured category column must exist: a misspelt one would silently make one category and an unstratified split."""
    if cfg.category_column and cfg.category_column not in keys:
        raise DataError(f"{path}: data.category_column {cfg.category_column!r} is not a column; found "
                        f"{', '.join(sorted(map(str, keys))) or 'none'} (set data.category_column: null for no categories)")


def read_wide(path: Path, cfg: DataSection) -> tuple[list[QARecord], str]:
    """Competition wide format: ``id, 질문_1, 질문_2, category, 답변_1 … 답변_5`` → phrasing × answer pairs."""
    header, rows, unit, used = read_rows(path, cfg)
    questions = sorted(c for c in header if c.startswith(cfg.question_prefix))
    answers = sorted(c for c in header if c.startswith(cfg.answer_prefix))
    _require(path, header, [cfg.id_column or "id"])
    _require_category(path, cfg, header)
    for found, prefix, key in ((questions, cfg.question_prefix, "question_prefix"), (answers, cfg.answer_prefix, "answer_prefix")):
        if not found:
            raise DataError(f"{path}: missing column(s) {prefix}1, {prefix}2, … (data.{key}); found {', '.join(header)}")
    if not rows:
        raise DataError(f"{path}: header only, no data rows")
    records = []
    seen: dict[str, tuple[int, dict[str, str]]] = {}
    for number, row in rows:
        group = row[cfg.id_column or "id"].strip() or f"{unit}{number}"
        if group in seen:
            first, content = seen[group]
            if content != row:
                raise DataError(f"{path}: {unit} {number}: duplicate id {group!r} (first at {unit} {first}) with different content")
            continue  # an exact repeat of a source row adds nothing
        seen[group] = (number, row)
        qs = [row[c] for c in questions if row[c].strip()]
        ans = [row[c] for c in answers if row[c].strip()]
        where = f"{path}: {unit} {number} (id {group})"
        if not qs:
            raise DataError(f"{where}: no usable question in {', '.join(questions)}")
        if not ans:
            raise DataError(f"{where}: no usable answer in {', '.join(answers)}")
        attrs = {c: row.get(c, "") for c in cfg.attribute_columns}
        for q in qs:
            for a in ans:
                records.append(QARecord(group, q, a, _category(row, cfg, header), f"{unit} {number}", attrs))
    return records, used


def read_qa(path: Path, cfg: DataSection) -> tuple[list[QARecord], str]:
    """Long table, one pair a row. Rows sharing an id (or, without ids, a question) form one group."""
    header, rows, unit, used = read_rows(path, cfg)
    _require(path, header, [cfg.question_column, cfg.answer_column, *cfg.attribute_columns])
    _require_category(path, cfg, header)
    if not rows:
        raise DataError(f"{path}: header only, no data rows")
    id_column = cfg.id_column if cfg.id_column and cfg.id_column in header else None
    records = []
    for number, row in rows:
        question, answer = row[cfg.question_column], row[cfg.answer_column]
        if not question.strip():
            raise DataError(f"{path}: {unit} {number}: empty {cfg.question_column!r}")
        if not answer.strip():
            raise DataError(f"{path}: {unit} {number}: no usable answer in column {cfg.answer_column!r}")
        group = row[id_column].strip() if id_column else " ".join(question.split())
        attrs = {c: row[c] for c in cfg.attribute_columns}
        records.append(QARecord(group or f"{unit}{number}", question, answer, _category(row, cfg, header), f"{unit} {number}", attrs))
    return records, used


def read_alpaca(path: Path, cfg: DataSection) -> tuple[list[QARecord], str]:
    """Alpaca JSON/JSONL: ``instruction`` (+ optional ``input``) → question, ``output`` → answer."""
    text, used = decode(path, path.read_bytes(), cfg.encoding)
    items = _rows_json(path, text)
    if not items:
        raise DataError(f"{path}: no records")
    _require_category(path, cfg, {key for _, item in items if isinstance(item, dict) for key in item})
    records = []
    for number, item in items:
        if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
            raise DataError(f"{path}: record {number}: needs the fields instruction and output")
        question = "\n".join(part for part in (str(item["instruction"]), str(item.get("input") or "")) if part.strip())
        if not str(item["output"]).strip():
            raise DataError(f"{path}: record {number}: no usable answer in field 'output'")
        category = str(item.get(cfg.category_column or "", "") or "all")
        records.append(QARecord(" ".join(question.split()), question, str(item["output"]), category, f"record {number}"))
    return records, used


def read_chat(path: Path, cfg: DataSection) -> tuple[list[QARecord], str]:
    """Chat JSONL: each line ``{"messages": [{"role", "content"}, ...]}``; every user → assistant turn is a pair.

    Earlier turns are not carried into the prompt: the records are single-turn Q&A.
    """
    text, used = decode(path, path.read_bytes(), cfg.encoding)
    lines = _rows_jsonl(path, text)
    _require_category(path, cfg, {key for _, item in lines if isinstance(item, dict) for key in item})
    records = []
    for number, item in lines:
        messages = item.get("messages") if isinstance(item, dict) else None
        if not isinstance(messages, list):
            raise DataError(f"{path}: line {number}: expected an object with a 'messages' list")
        category = str(item.get(cfg.category_column or "", "") or "all")
        pending = None
        for turn, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{path}: line {number}: message {turn} needs 'role' and 'content'")
            if message["role"] == "user":
                pending = str(message["content"])
            elif message["role"] == "assistant" and pending is not None:
                if str(message["content"]).strip():
                    records.append(QARecord(f"line{number}", pending, str(message["content"]), category, f"line {number}"))
                pending = None
    if not records:
        raise DataError(f"{path}: no user → assistant pairs with a usable answer")
    return records, used


READERS: dict[str, Callable[[Path, DataSection], tuple[list[QARecord], str]]] = {
    "wide": read_wide,
    "qa": read_qa,
    "alpaca": read_alpaca,
    "chat": read_chat,
}


def read_records(path: Path, cfg: DataSection) -> tuple[list[QARecord], str]:
    """Read ``path`` with the reader for ``cfg.format``.

    Raises:
        DataError: the file is missing, unreadable, or a row is unusable.
    """
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if path.is_dir():
        raise DataError(f"data.path: {path} is a directory, not a file")
    if path.suffix not in _TEXT_SUFFIXES | {".parquet"}:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")
    return READERS[cfg.format](path, cfg)


def read_question_column(path: Path, column: str) -> Any:
    """A CSV/JSONL file of questions as a DataFrame, checked to have ``column`` (``ask --file``, ``retrieve --file``).

    Raises:
        DataError: missing or unreadable file, or no such column (naming the file, the column and the option).
    """
    import pandas as pd

    if not path.exists():
        raise DataError(f"{path}: not found")
    try:
        frame = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise DataError(f"{path}: not a readable {path.suffix or 'CSV'} file: {exc}") from None
    if column not in frame.columns:
        raise DataError(f"{path}: missing question column {column!r} (--question-column); "
                        f"found {', '.join(map(str, frame.columns))}")
    return frame


def load_split(name: str, root: Path = Path("."), folder: Path = PREPARED_DIR) -> list[dict[str, Any]]:
    """Read one split: as prepared, or with its passages (``folder=RETRIEVED_DIR``, what train and evaluate read).

    Raises:
        DataError: when the split has not been written yet.
    """
    path = root / split(name, folder)
    if not path.exists():
        stage = {PREPARED_DIR: "prepare", AUGMENTED_DIR: "augment"}.get(folder, "index")
        raise DataError(f"{path}: not found; run `loraops {stage}` (or `dvc repro {stage}`) first")
    return [json.loads(line) for line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]
