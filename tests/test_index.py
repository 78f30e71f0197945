"""Stage `index` and `loraops retrieve`: Korean documents read, chunked at sentences, found by their morphemes."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from helpers import REPO
from loraops.core.config import load_params
from loraops.core.errors import ConfigError, DataError
from loraops.retrieval import index as retrieval
from loraops.stages import index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The shipped documents indexed twice: morpheme terms and whitespace words."""
    roots = {}
    for tokenizer in ("morphemes", "whitespace"):
        root = tmp_path_factory.mktemp(tokenizer)
        shutil.copytree(REPO / "data/docs", root / "data/docs")
        params = load_params(REPO / "params.yaml", [f"rag.tokenizer={tokenizer}"])
        index.build(params, root)
        roots[tokenizer] = (params, root)
    return roots


def _customer_questions():
    return [(r["question"], r["doc"]) for r in csv.DictReader(open(REPO / "benchmarks/data/retrieval_paraphrases.csv", encoding="utf-8"))]


def test_morpheme_terms_find_what_customers_ask_far_more_often_than_whitespace_words(built):
    """The judgement that makes morphemes the default: held-out customer questions, particles and endings attached."""
    hits = {}
    for tokenizer, (params, root) in built.items():
        retriever = retrieval.Retriever(params, root)
        hits[tokenizer] = sum(retriever.search(q, 1)[0]["id"] == doc for q, doc in _customer_questions() if retriever.search(q, 1))
    n = len(_customer_questions())
    assert hits["morphemes"] / n >= 0.8 and hits["morphemes"] >= hits["whitespace"] + 0.15 * n, hits


def test_particles_and_endings_do_not_hide_a_word(built):
    params, root = built["morphemes"]
    terms = retrieval.Terms("morphemes", params)
    assert "벽지" in terms("벽지가 들떴어요") and "곰팡이" in terms("곰팡이를")
    retriever = retrieval.Retriever(params, root)
    assert retriever.search("욕실 실리콘이 까맣게 변했어요", 3)[0]["id"] == "silicone-caulking"
    assert all(set(hit) == {"id", "score", "text"} for hit in retriever.search("결로가 생겨요", 3))


def test_chunks_end_at_sentences_stay_under_the_size_and_overlap():
    text = "첫 문장입니다. 두 번째 문장은 조금 더 깁니다. 세 번째 문장입니다. 네 번째 문장으로 끝납니다."
    chunks = retrieval.chunk("doc", text, size=40, overlap=15)
    assert [c.id for c in chunks] == [f"doc#{i}" for i in range(len(chunks))] and len(chunks) > 1
    assert all(len(c.text) <= 40 and c.text.endswith(".") for c in chunks)
    assert chunks[1].text.startswith("세 번째 문장입니다.")  # the last sentence (≤ 15 characters) carried over
    assert retrieval.chunk("short", "한 문장.", 400, 80)[0].id == "short"  # one chunk keeps the document id


def test_documents_from_jsonl_csv_and_cp949_files(tmp_path):
    params = load_params(REPO / "params.yaml")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_bytes("결로는 단열 부족으로 생깁니다.".encode("cp949"))
    (tmp_path / "docs/sub").mkdir()
    (tmp_path / "docs/sub/b.md").write_text("# 방수\n\n방수층을 올립니다.", encoding="utf-8")
    (tmp_path / "docs/skip.pdf").write_bytes(b"%PDF")
    cfg = params.rag.model_copy(update={"docs_path": "docs"})
    assert retrieval.read_documents(cfg, tmp_path) == [("a", "결로는 단열 부족으로 생깁니다."), ("sub/b", "# 방수\n\n방수층을 올립니다.")]
    (tmp_path / "d.jsonl").write_text('{"id": "x", "text": "하나"}\n{"id": "y", "text": "둘"}\n', encoding="utf-8")
    assert len(retrieval.read_documents(cfg.model_copy(update={"docs_path": "d.jsonl"}), tmp_path)) == 2
    (tmp_path / "d.csv").write_text("id,text\nx,하나\n", encoding="utf-8")
    assert retrieval.read_documents(cfg.model_copy(update={"docs_path": "d.csv"}), tmp_path) == [("x", "하나")]


@pytest.mark.parametrize("setup, message", [
    (lambda p: (p / "docs").mkdir(), r"docs: no \.md or \.txt documents"),
    (lambda p: (p / "docs.jsonl").write_text('{"id": "a", "text": "가"}\n{"text": "나"}\n', encoding="utf-8"), r"line 2: missing id"),
    (lambda p: (p / "docs.jsonl").write_text('{"id": "a", "text": "가"}\n{"id": "a", "text": "나"}\n', encoding="utf-8"),
     r"duplicate document id 'a' \(records 1 and 2\)"),
    (lambda p: (p / "docs.csv").write_text("name,text\na,가\n", encoding="utf-8"), r"missing column\(s\) id"),
    (lambda p: ((p / "docs").mkdir(), (p / "docs/bad.md").write_bytes(b"\xff\xfe\x00\x81binary\x00")), r"bad\.md: looks like a binary"),
])
def test_bad_documents_name_the_file_and_line(tmp_path, setup, message):
    setup(tmp_path)
    name = "docs" if (tmp_path / "docs").exists() else next(p.name for p in tmp_path.iterdir())
    cfg = load_params(REPO / "params.yaml").rag.model_copy(update={"docs_path": name})
    with pytest.raises(DataError, match=message):
        retrieval.read_documents(cfg, tmp_path)


def test_bad_rag_params_name_their_keys():
    with pytest.raises(ConfigError, match=r"rag\.k"):
        load_params(REPO / "params.yaml", ["rag.k=0"])
    with pytest.raises(ConfigError, match=r"rag\.chunk_overlap: 400 must be below rag\.chunk_chars"):
        load_params(REPO / "params.yaml", ["rag.chunk_overlap=400"])
    with pytest.raises(ConfigError, match=r"rag\.template: rag\.enabled needs \{context\}"):
        load_params(REPO / "params.yaml", ["rag.enabled=true", "rag.template='Q {question} A '"])
    with pytest.raises(ConfigError, match=r"rag\.template: unknown field\(s\) \{target\}"):
        load_params(REPO / "params.yaml", ["rag.enabled=true", "rag.template='{context} {target} {question}'"])
    with pytest.raises(ConfigError, match=r"rag\.gold_column: 'doc' must also be listed in data\.attribute_columns"):
        load_params(REPO / "params.yaml", ["rag.gold_column=doc"])
    assert load_params(REPO / "params.yaml", ["rag.enabled=true"]).prompt_template.count("{context}") == 1


def test_retrieve_cli_json_file_and_errors(built, tmp_path):
    params, root = built["morphemes"]
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, root / name)
    from helpers import run_cli

    one = run_cli(["retrieve", "창문에 물방울이 맺혀요", "--k", "2", "--json"], root)
    assert one.returncode == 0, one.stderr
    line = json.loads(one.stdout)
    assert line["question"] == "창문에 물방울이 맺혀요" and len(line["results"]) == 2
    assert line["results"][0]["id"] == "condensation" and set(line["results"][0]) == {"id", "score", "text"}
    (tmp_path / "q.csv").write_text("문의,x\n벽지가 들떴어요,1\n거실이 좁아 보여요,2\n", encoding="utf-8")
    many = run_cli(["retrieve", "--file", str(tmp_path / "q.csv"), "--out", str(tmp_path / "r.jsonl"), "--k", "1",
                    "--question-column", "문의"], root)
    assert many.returncode == 0, many.stderr
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["results"][0]["id"] for r in rows] == ["wallpaper-lifting", "small-living-room"]
    for args, message in ((["retrieve", "x", "--k", "0"], "--k: must be at least 1"),
                          (["retrieve", "--file", str(tmp_path / "q.csv")], "missing question column 'question'"),
                          (["retrieve", "x", "--mode", "dense"], "rebuild with `loraops index --set rag.mode=dense`")):
        bad = run_cli(args, root)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    (root / "data/index/card.json").unlink()
    missing = run_cli(["retrieve", "x"], root)
    assert missing.returncode == 2 and "run `loraops index`" in missing.stderr


# ---------------------------------------------------------------- passages in the prompts (rag.enabled)


def _prepared(root, *overrides):
    from loraops.stages import augment, prepare

    params = load_params(REPO / "params.yaml", [f"data.path={REPO / 'data/raw/interior_qa.csv'}", *overrides])
    prepare.run(params, root)
    augment.run(params, root)  # augment.enabled off: the prepared train split, byte for byte
    return params


def test_with_rag_off_the_rows_train_reads_are_the_prepared_rows_unchanged(built):
    params, root = built["morphemes"]
    params = _prepared(root)
    index.attach(params, root)
    assert (root / "data/augmented/train.jsonl").read_bytes() == (root / "data/prepared/train.jsonl").read_bytes()
    for name in ("train", "validation", "test"):
        assert (root / f"data/retrieved/{name}.jsonl").read_bytes() == (root / f"data/prepared/{name}.jsonl").read_bytes()


def test_training_prompts_never_hold_their_own_answer_and_mix_in_distractors(tmp_path):
    """rag.corpus: train indexes the training answers; a training question must get its passages as a test question
    would (without its own answer), plus a random other passage at a random place (RAFT)."""
    params = _prepared(tmp_path, "rag.enabled=true", "rag.corpus=train", "rag.k=1", "rag.train_distractors=1",
                       "rag.max_context_chars=600")
    index.build(params, tmp_path)
    index.attach(params, tmp_path)
    read = lambda name: [json.loads(line) for line in (tmp_path / f"data/retrieved/{name}.jsonl").open(encoding="utf-8")]  # noqa: E731
    train, test = read("train"), read("test")
    assert all(row["group"] not in {retrieval.doc_of(s) for s in row["sources"]} for row in train)
    assert all(len(row["sources"]) == 2 and len(row["distractors"]) == 1 for row in train)  # both fit in 600 characters
    positions = {row["sources"].index(row["retrieved"][0]) for row in train if row["retrieved"][0] in row["sources"]}
    assert positions == {0, 1}  # the distractor goes before or after the retrieved passage
    prepared_test = [json.loads(line) for line in (tmp_path / "data/prepared/test.jsonl").open(encoding="utf-8")]
    assert [r["prompt_plain"] for r in test] == [r["prompt"] for r in prepared_test]
    for row in test:  # evaluation gets the top k, no distractors; the prompt is rag.template with the passages
        assert row["sources"] == row["retrieved"] and len(row["sources"]) == 1 and row["distractors"] == []
        assert row["prompt"] == f"참고 자료:\n{row['context']}\n\n질문: {row['question']}\n답변: "
        assert row["context"].startswith("[1] ") and len(row["context"]) <= 600


def test_context_keeps_the_best_passages_that_fit():
    results = [{"id": "a", "text": "가" * 50}, {"id": "b", "text": "나" * 50}, {"id": "c", "text": "다" * 50}]
    context, ids = retrieval.context_of(results, 120)
    assert ids == ["a", "b"] and context == "[1] " + "가" * 50 + "\n[2] " + "나" * 50
    context, ids = retrieval.context_of(results, 30)  # a first passage longer than the budget is cut, not dropped
    assert ids == ["a"] and len(context) == 30


def test_hit_at_k_and_mrr_against_known_gold_documents():
    from loraops.stages.evaluate import retrieval_quality

    rows = [{"attributes": {"doc": "condensation"}, "retrieved": ["condensation#0", "leaks"]},
            {"attributes": {"doc": "leaks|waterproofing"}, "retrieved": ["condensation", "waterproofing#1"]},
            {"attributes": {"doc": "curtains"}, "retrieved": ["condensation", "leaks"]},
            {"attributes": {"doc": ""}, "retrieved": ["condensation"]}]  # no gold: left out
    assert retrieval_quality(rows, "doc", 2) == {"k": 2, "n_with_gold": 3, "hit@k": round(2 / 3, 6),
                                                 "mrr": round((1 + 0.5 + 0) / 3, 6)}


def test_the_index_files_are_the_same_bytes_in_every_process(tmp_path):
    """Python's hash seed changes per process; the index (a DVC output) must not."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from loraops.stages import index; from loraops.core.config import load_params\n"
            f"p = load_params(Path({str(REPO)!r}) / 'params.yaml')\n"
            "root = Path(sys.argv[1]); (root / 'data').mkdir(parents=True, exist_ok=True)\n"
            f"import shutil; shutil.copytree(Path({str(REPO)!r}) / 'data/docs', root / 'data/docs')\n"
            "index.build(p, root)")
    digests = []
    for seed in ("1", "2"):
        root = tmp_path / seed
        subprocess.run([sys.executable, "-c", code, str(root)], check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        files = sorted(p for p in (root / "data/index").rglob("*") if p.is_file())
        digests.append({f.relative_to(root).as_posix(): hashlib.md5(f.read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
