"""Retrieval quality and speed on Korean: BM25 over whitespace words vs over kiwipiepy morphemes, dense and
hybrid, on a held-out paraphrase task built from the sample data.

The documents in ``data/docs`` are one guidance page per topic of the sample Q&A (36 topics: 벽지 들뜸, 결로,
방수 공사, ...), written separately from it. Two query sets, each query's relevant document known:

- ``sample``: every question phrasing of the sample data (질문_1, 질문_2; 360 queries). They name the topic
  with the same noun phrase as the page's title ("벽지 들뜸 문제는..."), so even whitespace words match.
- ``customer``: ``benchmarks/data/retrieval_paraphrases.csv``, 72 questions written for this benchmark the way
  customers ask (two per topic, held out from the training data): particles and verb endings glued to the words
  ("벽지가 들떴어요", "물방울이 맺혀요"), other words for the same thing.

The script prints recall@1, recall@5 and MRR@10 per mode side by side, queries/s, and the ratio to whitespace
BM25; the last line is ``morpheme_bm25_recall1_vs_whitespace: X.XX`` on the customer set.

    python benchmarks/retrieval.py
    python benchmarks/retrieval.py --encoder /path/to/multilingual-encoder   # dense/hybrid with a real encoder
    python benchmarks/retrieval.py --smoke   # every 12th query: checks the benchmark runs (the suite runs it)
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOPIC_DOCS = {
    "벽지 들뜸": "wallpaper-lifting", "벽지 울음": "wallpaper-bubbling", "벽지 이음매 벌어짐": "wallpaper-seams",
    "벽지 곰팡이": "wallpaper-mold", "도배 얼룩": "wallpaper-stains", "몰딩 틈새": "molding-gaps",
    "타일 줄눈 탈락": "tile-grout-loss", "도장면 기포": "paint-blisters", "합지 벽지": "paper-wallpaper",
    "실크 벽지": "silk-wallpaper", "강마루": "laminate-floor", "원목마루": "hardwood-floor", "장판": "vinyl-flooring",
    "포세린 타일": "porcelain-tile", "친환경 페인트": "eco-paint", "석고보드": "gypsum-board",
    "도배 전 초배 작업": "priming-before-wallpaper", "타일 시공": "tile-installation", "마루 시공": "floor-installation",
    "실리콘 코킹": "silicone-caulking", "방수 공사": "waterproofing", "단열 공사": "insulation", "페인트 시공": "paint-work",
    "욕실 줄눈": "bathroom-grout", "좁은 거실": "small-living-room", "조명 계획": "lighting-plan",
    "포인트 벽지": "accent-wallpaper", "주방 수납": "kitchen-storage", "아이 방 꾸미기": "kids-room",
    "현관 인테리어": "entrance", "커튼 선택": "curtains", "벽체 균열": "wall-cracks", "결로": "condensation",
    "누수": "leaks", "층간 소음": "floor-noise", "내력벽 철거": "load-bearing-walls",
}


def _queries() -> list[tuple[str, str]]:
    rows = list(csv.DictReader(open(ROOT / "data/raw/interior_qa.csv", encoding="utf-8")))
    out = []
    for row in rows:
        topic = re.split(r" 문제| 현상| 에 ", row["질문_1"])[0]
        for column in ("질문_1", "질문_2"):
            out.append((row[column], TOPIC_DOCS[topic]))
    return out


def _customer() -> list[tuple[str, str]]:
    rows = csv.DictReader(open(ROOT / "benchmarks/data/retrieval_paraphrases.csv", encoding="utf-8"))
    return [(row["question"], row["doc"]) for row in rows]


def _measure(retriever, queries: list[tuple[str, str]]) -> dict:
    hits1 = hits5 = mrr = 0.0
    start = time.perf_counter()
    for query, gold in queries:
        ids = [r["id"].split("#")[0] for r in retriever.search(query, 10)]
        hits1 += ids[:1] == [gold]
        hits5 += gold in ids[:5]
        mrr += 1 / (ids.index(gold) + 1) if gold in ids else 0
    seconds = time.perf_counter() - start
    n = len(queries)
    return {"recall@1": hits1 / n, "recall@5": hits5 / n, "mrr@10": mrr / n, "qps": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None, help="sentence-transformers encoder for dense/hybrid (default rag.encoder)")
    parser.add_argument("--smoke", action="store_true", help="every 12th query of each set: checks the benchmark runs "
                                                             "(the test suite runs it so it cannot rot); figures mean little")
    args = parser.parse_args()

    from loraops.core.config import load_params
    from loraops.retrieval import index as retrieval
    from loraops.stages import index

    sets = {"sample": _queries(), "customer": _customer()}
    if args.smoke:
        sets = {name: queries[::12] for name, queries in sets.items()}
    work = Path(tempfile.mkdtemp(prefix="loraops-retrieval-"))
    results: dict[str, dict[str, dict]] = {name: {} for name in sets}
    try:
        shutil.copytree(ROOT / "data/docs", work / "data/docs")
        extra = [f"rag.encoder={args.encoder}"] if args.encoder else []
        for label, tokenizer, mode in (("bm25 whitespace", "whitespace", "bm25"), ("bm25 morphemes", "morphemes", "bm25"),
                                       ("dense", "morphemes", "dense"), ("hybrid (RRF)", "morphemes", "hybrid")):
            params = load_params(ROOT / "params.yaml", [f"rag.tokenizer={tokenizer}", "rag.mode=hybrid", *extra])
            if mode == "bm25":
                card = index.build(params, work)
            retriever = retrieval.Retriever(params, work, mode=mode)
            for name, queries in sets.items():
                results[name][label] = _measure(retriever, queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{card['documents']} documents ({card['chunks']} chunks); dense encoder: {params.rag.encoder}")
    for name, table in results.items():
        base = table["bm25 whitespace"]
        print(f"\n{name}: {len(sets[name])} Korean questions")
        print("| mode | recall@1 | recall@5 | MRR@10 | queries/s | recall@1 vs whitespace |")
        print("|---|---|---|---|---|---|")
        for label, r in table.items():
            print(f"| {label} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['mrr@10']:.3f} | {r['qps']:.0f} | "
                  f"{r['recall@1'] / max(base['recall@1'], 1e-9):.2f}x |")
    customer = results["customer"]
    print(f"morpheme_bm25_recall1_vs_whitespace: "
          f"{customer['bm25 morphemes']['recall@1'] / max(customer['bm25 whitespace']['recall@1'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
