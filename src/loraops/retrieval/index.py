"""Retrieval over domain documents: reading them, sentence-aware chunks, a Korean morpheme BM25 index and dense vectors,
and passages for prompts.

`Retriever` answers queries over the index stage's output (``data/index``) in the configured ``rag.mode``:
``bm25`` (kiwipiepy content morphemes scored by bm25s; ``rag.tokenizer: whitespace`` is the baseline that
misses Korean words carrying particles and endings), ``dense`` (cosine over ``rag.encoder`` vectors) or
``hybrid`` (reciprocal rank fusion of both). Result ids are the document id, or ``<doc id>#<chunk>`` for a
document cut into several chunks. The stage that builds the index is ``stages.index``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops.core.config import Params, RagSection
from loraops.core.errors import ConfigError, DataError
from loraops.core.paths import INDEX_CARD, INDEX_CHUNKS, INDEX_DIR, INDEX_VECTORS
from loraops.core.readers import decode
from loraops.core.utils import jsonl_lines

DOC_SUFFIXES = (".md", ".txt")


_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")


BM25_DIR = "bm25"


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    text: str


# ---------------------------------------------------------------- documents


def read_documents(cfg: RagSection, root: Path = Path(".")) -> list[tuple[str, str]]:
    """``(id, text)`` of every document under ``rag.docs_path`` (or of the training answers, ``rag.corpus: train``).

    Raises:
        DataError: missing or empty folder, an undecodable file, a record without id/text, duplicate ids.
    """
    if cfg.corpus == "train":
        from loraops.core.readers import load_split

        seen: dict[str, str] = {}
        for row in load_split("train", root):  # never validation or test: the index must not hold their answers
            seen.setdefault(row["group"], row["answer"])
        return sorted(seen.items())
    path = root / cfg.docs_path
    if not path.exists():
        raise DataError(f"rag.docs_path: {cfg.docs_path} not found (a folder of .md/.txt, or a .jsonl/.csv with id and text)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .md or .txt documents in this folder (rag.docs_path)")
        docs = []
        for file in files:
            text, _ = decode(file, file.read_bytes(), "auto")
            docs.append((file.relative_to(path).with_suffix("").as_posix(), text))
    elif path.suffix.lower() == ".jsonl":
        docs = _jsonl_documents(path)
    elif path.suffix.lower() == ".csv":
        docs = _csv_documents(path)
    else:
        raise DataError(f"rag.docs_path: {path} is neither a folder nor a .jsonl/.csv file")
    ids: dict[str, int] = {}
    for number, (doc_id, _) in enumerate(docs, start=1):
        if doc_id in ids:
            raise DataError(f"{path}: duplicate document id {doc_id!r} (records {ids[doc_id]} and {number})")
        ids[doc_id] = number
    return docs


def _record(path: Path, where: str, row: dict[str, Any]) -> tuple[str, str]:
    doc_id, text = str(row.get("id") or "").strip(), str(row.get("text") or "").strip()
    if not doc_id or not text:
        missing = ", ".join(k for k, v in (("id", doc_id), ("text", text)) if not v)
        raise DataError(f"{path}: {where}: missing {missing}")
    return doc_id, text


def _jsonl_documents(path: Path) -> list[tuple[str, str]]:
    text, _ = decode(path, path.read_bytes(), "auto")
    docs = []
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected an object with id and text")
        docs.append(_record(path, f"line {number}", row))
    if not docs:
        raise DataError(f"{path}: no documents")
    return docs


def _csv_documents(path: Path) -> list[tuple[str, str]]:
    text, _ = decode(path, path.read_bytes(), "auto")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("id", "text") if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    docs = [_record(path, f"line {reader.line_num}", row) for row in reader]
    if not docs:
        raise DataError(f"{path}: no documents")
    return docs


def sentences(text: str) -> list[str]:
    """Sentences of Korean (or mixed) prose: split after sentence-final punctuation and at blank lines."""
    from loraops.core.text import clean_text

    parts = [p.strip() for p in _SENTENCE_END.split(clean_text(text)) if p and p.strip()]
    return [p.lstrip("#").strip() if p.startswith("#") else p for p in parts]


def chunk(doc_id: str, text: str, size: int, overlap: int) -> list[Chunk]:
    """Pack whole sentences into chunks of at most ``size`` characters (a longer sentence is cut); each chunk
    after the first starts with the previous chunk's last sentences, up to ``overlap`` characters."""
    pieces: list[str] = []
    for sentence in sentences(text):
        pieces += [sentence[i: i + size] for i in range(0, len(sentence), size)]
    chunks: list[list[str]] = []
    current: list[str] = []
    for piece in pieces:
        if current and len(" ".join([*current, piece])) > size:
            chunks.append(current)
            carried: list[str] = []
            for previous in reversed(current):
                if len(" ".join([previous, *carried])) > overlap:
                    break
                carried.insert(0, previous)
            current = carried if len(" ".join([*carried, piece])) <= size else []
        current.append(piece)
    if current:
        chunks.append(current)
    if len(chunks) == 1:
        return [Chunk(doc_id, doc_id, " ".join(chunks[0]))]
    return [Chunk(f"{doc_id}#{n}", doc_id, " ".join(c)) for n, c in enumerate(chunks)]


# ---------------------------------------------------------------- terms and vectors


class Terms:
    """What BM25 counts: kiwipiepy content morphemes (Korean words without their particles and endings), or
    whitespace words."""

    def __init__(self, kind: str, params: Params) -> None:
        self.kind = kind
        if kind == "morphemes":
            from loraops.judge.metrics import Morphemes

            self._morphemes = Morphemes(params.eval.morph_pos, params.eval.morph_analyzer)

    def __call__(self, text: str) -> list[str]:
        if self.kind == "whitespace":
            return [w.lower() for w in re.findall(r"\w+", text)]
        return [m.lower() for m in self._morphemes(text)]


def encoder(name: str) -> Any:
    from sentence_transformers import SentenceTransformer

    from loraops.core.utils import pick_device
    from loraops.judge.metrics import resolve_encoder

    try:
        return SentenceTransformer(resolve_encoder(name), device=pick_device("auto"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"rag.encoder: cannot load {name!r}: {str(exc).splitlines()[0]}") from None


def bm25_index(chunks: list[Chunk], terms: Terms) -> Any:
    import bm25s

    docs = [terms(c.text) or ["∅"] for c in chunks]
    # bm25s numbers the vocabulary in the order of a set of strings, which changes with Python's hash seed from one
    # process to the next: the same documents gave other index files (and dvc.lock lines) on every run. Sorted ids
    # give the same scores and the same files every time.
    vocab = {token: i for i, token in enumerate(sorted({t for doc in docs for t in doc}))}
    retriever = bm25s.BM25()
    retriever.index(([[vocab[t] for t in doc] for doc in docs], vocab), show_progress=False)
    return retriever


# ---------------------------------------------------------------- the stage


class Retriever:
    """Queries over a built index, in the mode it was built for (or a mode it has the parts for)."""

    def __init__(self, params: Params, root: Path = Path("."), mode: str | None = None, folder: Path | None = None) -> None:
        import bm25s
        import numpy as np

        folder = folder or root / INDEX_DIR
        if not (folder / INDEX_CARD.name).exists():
            raise DataError(f"{folder}: no index; run `loraops index` (or `dvc repro index`) first")
        self.card = json.loads((folder / INDEX_CARD.name).read_text(encoding="utf-8"))
        self.params, self.mode = params, mode or params.rag.mode
        lines = jsonl_lines((folder / INDEX_CHUNKS.name).read_text(encoding="utf-8"))
        self.chunks = [Chunk(**json.loads(line)) for line in lines if line.strip()]
        self.terms = Terms(self.card["tokenizer"], params)
        self.bm25 = bm25s.BM25.load(str(folder / BM25_DIR))
        self.vectors = np.load(folder / INDEX_VECTORS.name) if (folder / INDEX_VECTORS.name).exists() else None
        if self.mode != "bm25" and self.vectors is None:
            raise ConfigError(f"rag.mode: {self.mode} needs dense vectors, but the index was built with mode "
                              f"{self.card['mode']}; rebuild with `loraops index --set rag.mode={self.mode}`")
        self._encoder = encoder(self.card["encoder"]) if self.vectors is not None and self.mode != "bm25" else None

    def _bm25_ranked(self, query: str, depth: int) -> list[tuple[int, float]]:
        tokens = self.terms(query)
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens)
        order = scores.argsort()[::-1][:depth]
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]

    def _dense_ranked(self, query: str, depth: int) -> list[tuple[int, float]]:
        assert self._encoder is not None, "dense ranking needs an index built with vectors (search checks the mode)"
        vector = self._encoder.encode([query], normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)[0]
        scores = self.vectors @ vector
        order = scores.argsort()[::-1][:depth]
        return [(int(i), float(scores[i])) for i in order]

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """The top ``k`` chunks: ``{"id", "score", "text"}``, best first."""
        if k <= 0:
            raise ConfigError(f"rag.k / --k: must be at least 1, got {k}")
        depth = max(k, 50) if self.mode == "hybrid" else k
        if self.mode == "bm25":
            ranked = self._bm25_ranked(query, k)
        elif self.mode == "dense":
            ranked = self._dense_ranked(query, k)
        else:
            fused: dict[int, float] = {}
            for ranking in (self._bm25_ranked(query, depth), self._dense_ranked(query, depth)):
                for rank, (i, _) in enumerate(ranking, start=1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (self.params.rag.rrf_k + rank)
            ranked = sorted(fused.items(), key=lambda item: -item[1])[:k]
        return [{"id": self.chunks[i].id, "score": round(score, 6), "text": self.chunks[i].text} for i, score in ranked]


def retrieve_file(retriever: Retriever, path: Path, out: Path, k: int, column: str = "question") -> int:
    """Answer every question of a CSV/JSONL file with its top-``k`` passages as JSONL; return the count.

    Raises:
        DataError: unreadable file or no such column (naming the file and the column).
    """
    from loraops.core.readers import read_question_column

    frame = read_question_column(path, column)
    lines = [json.dumps({"question": str(q), "results": retriever.search(str(q), k)}, ensure_ascii=False)
             for q in frame[column].astype(str)]
    from loraops.core.utils import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "\n".join(lines) + "\n")
    return len(lines)


# ---------------------------------------------------------------- passages in the prompts (rag.enabled)


def context_of(results: list[dict[str, Any]], max_chars: int) -> tuple[str, list[str]]:
    """The ``{context}`` text, numbered passages in order while they fit in ``max_chars`` (a first passage longer
    than that is cut), and the ids of the passages it holds."""
    parts: list[str] = []
    ids: list[str] = []
    for result in results:
        text = f"[{len(parts) + 1}] {result['text']}"
        if parts and len("\n".join([*parts, text])) > max_chars:
            break
        parts.append(text[:max_chars])
        ids.append(result["id"])
    return "\n".join(parts), ids


def doc_of(result_id: str) -> str:
    """The document id of a result id (``<doc id>#<chunk>`` for chunks)."""
    return result_id.split("#", 1)[0]


def with_passages(row: dict[str, Any], results: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """A prepared row with its passages: ``prompt`` from ``rag.template``, the prompt without retrieval kept as
    ``prompt_plain``, ``context``, ``sources`` (the ids in the context), ``retrieved`` (the ranked top k) and
    ``distractors`` (training only: the random passages among the sources)."""
    from loraops.core.text import fill

    context, sources = context_of(results, params.rag.max_context_chars)
    values = {"question": row["question"], "category": row["category"], **row.get("attributes", {}), "context": context}
    return {**row, "prompt": fill(params.rag.template, values, "rag.template"), "prompt_plain": row["prompt"],
            "context": context, "sources": sources,
            "retrieved": [r["id"] for r in results if not r.get("distractor")][: params.rag.k],
            "distractors": [r["id"] for r in results if r.get("distractor") and r["id"] in sources]}


def training_passages(row: dict[str, Any], retriever: Retriever, params: Params, rng: Any) -> list[dict[str, Any]]:
    """A training question's passages: the top k without its own answer (``rag.corpus: train``: the adapter must
    learn from passages as a test question gets them) and ``rag.train_distractors`` random other passages (RAFT),
    so it learns to ignore what does not answer the question. The retrieved passages have the first claim on
    ``rag.max_context_chars``; the distractors that still fit go to random places among them."""
    cfg = params.rag
    own = str(row["group"]) if cfg.corpus == "train" else None
    results = [r for r in retriever.search(row["question"], cfg.k + 5) if doc_of(r["id"]) != own][: cfg.k]
    taken = {doc_of(r["id"]) for r in results} | {own}
    pool = [c for c in retriever.chunks if c.doc_id not in taken]
    distractors = [{"id": c.id, "score": 0.0, "text": c.text, "distractor": True} for c in rng.sample(pool, min(cfg.train_distractors, len(pool)))]
    _, fitting = context_of(results + distractors, cfg.max_context_chars)
    chosen = [r for r in results if r["id"] in fitting]
    for distractor in (d for d in distractors if d["id"] in fitting):
        chosen.insert(rng.randrange(len(chosen) + 1), distractor)
    return chosen
