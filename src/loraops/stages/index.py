"""Stage `index`: domain documents → sentence-aware chunks → a Korean morpheme BM25 index and dense vectors
(``data/index``); with ``rag.enabled``, the prepared splits with each question's passages (``data/retrieved``).
What retrieval is (chunks, terms, modes) is ``retrieval.index``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraops.core.config import BUNDLED_ENCODER, Params
from loraops.core.paths import (AUGMENTED_DIR, INDEX_CARD, INDEX_CHUNKS, INDEX_DIR, INDEX_VECTORS, PREPARED_DIR,
                                RETRIEVED_DIR, SPLITS, split)
from loraops.core.utils import atomic_dir, jsonl_line, say
from loraops.retrieval.index import (BM25_DIR, Retriever, Terms, bm25_index, chunk, encoder, read_documents,
                                     training_passages, with_passages)


def build(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Chunk the documents, index them (BM25 always; vectors when the mode uses them) and write ``data/index``."""
    import numpy as np

    cfg = params.rag
    docs = read_documents(cfg, root)
    chunks = [c for doc_id, text in docs for c in chunk(doc_id, text, cfg.chunk_chars, cfg.chunk_overlap)]
    terms = Terms(cfg.tokenizer, params)
    retriever = bm25_index(chunks, terms)
    vectors = None
    if cfg.mode in ("dense", "hybrid") and cfg.encoder == BUNDLED_ENCODER:
        say(f"warning: rag.mode {cfg.mode} with rag.encoder {BUNDLED_ENCODER}, which is English-only: dense retrieval "
            "is not valid on Korean (benchmarks/retrieval.py: recall@1 under 0.1 where morpheme BM25 has 0.88); "
            "use rag.mode bm25, or a multilingual encoder")
    if cfg.mode in ("dense", "hybrid"):
        vectors = encoder(cfg.encoder).encode([c.text for c in chunks], normalize_embeddings=True,
                                              show_progress_bar=False, convert_to_numpy=True)
    card = {"documents": len(docs), "chunks": len(chunks), "corpus": cfg.corpus,
            "source": cfg.docs_path if cfg.corpus == "docs" else "data/prepared/train.jsonl (answers)",
            "mode": cfg.mode, "tokenizer": cfg.tokenizer, "encoder": cfg.encoder if vectors is not None else None,
            "encoder_valid_on_korean": (cfg.encoder != BUNDLED_ENCODER) if vectors is not None else None,
            "chunk_chars": cfg.chunk_chars, "chunk_overlap": cfg.chunk_overlap,
            "mean_chunk_chars": round(sum(len(c.text) for c in chunks) / max(1, len(chunks)), 1)}
    with atomic_dir(root / INDEX_DIR) as tmp:
        with (tmp / INDEX_CHUNKS.name).open("w", encoding="utf-8") as fh:
            for c in chunks:
                fh.write(jsonl_line(asdict(c)))
        retriever.save(str(tmp / BM25_DIR))
        if vectors is not None:
            np.save(tmp / INDEX_VECTORS.name, vectors.astype("float32"))
        (tmp / INDEX_CARD.name).write_text(json.dumps(card, ensure_ascii=False, indent=2), encoding="utf-8")
    return card


def attach(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Write ``data/retrieved``: each split (train as augmented, ``data/augmented``), its rows with their passages
    when ``rag.enabled`` (else unchanged); return counts."""
    import random

    from loraops.core.readers import load_split

    rows = {name: load_split(name, root, AUGMENTED_DIR if name == "train" else PREPARED_DIR) for name in SPLITS}
    figures: dict[str, Any] = {"enabled": params.rag.enabled}
    if params.rag.enabled:
        retriever = Retriever(params, root)
        rng = random.Random(params.base.seed)
        for name in SPLITS:
            rows[name] = [with_passages(r, training_passages(r, retriever, params, rng) if name == "train"
                                        else retriever.search(r["question"], params.rag.k), params)
                          for r in rows[name]]
        every = [r for name in SPLITS for r in rows[name]]
        figures.update(mean_context_chars=round(sum(len(r["context"]) for r in every) / max(1, len(every)), 1),
                       empty_contexts=sum(not r["context"] for r in every))
    with atomic_dir(root / RETRIEVED_DIR) as tmp:
        for name in SPLITS:
            with (tmp / split(name).name).open("w", encoding="utf-8") as fh:
                for row in rows[name]:
                    fh.write(jsonl_line(row))
    return figures


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """The DVC stage: build ``data/index`` from the documents, then ``data/retrieved``; return the index card.

    Indexing documents needs no training data: before any split exists (a fresh clone, `loraops index` first),
    the index is built and ``data/retrieved`` is left for the stage to write once the splits are there.
    """
    card = build(params, root)
    missing = [str(path) for path in _split_inputs(root) if not path.exists()]
    if missing:
        card["prompts"] = {"enabled": params.rag.enabled, "skipped": f"no {', '.join(missing)} yet"}
    else:
        card["prompts"] = attach(params, root)
    return card


def _split_inputs(root: Path) -> list[Path]:
    return [root / split(name, AUGMENTED_DIR if name == "train" else PREPARED_DIR) for name in SPLITS]
