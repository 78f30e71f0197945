"""Retrieval in front of the adapter, end to end: `loraops run --set rag.enabled=true` on the sample data trains
and evaluates with passages, reports the four arms and hit@k/MRR, registers the index with the adapter, and
`ask`, the pyfunc model and `loraops serve` answer with the same passages and name them."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import (REPO, free_port, loraops_in_one_process, make_workspace, small_loop_overrides, start_server,
                     stop_server, wait_http)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAG = ["rag.enabled=true", "rag.k=1", "rag.max_context_chars=600", "rag.train_distractors=1", "model.max_length=384",
       "data.attribute_columns=[doc]", "rag.gold_column=doc", "data.path=data/raw/interior_qa_docs.csv"]


def _sample_with_gold_documents(ws):
    """The sample data with a `doc` column: the page of data/docs each source row's topic is about (the mapping
    benchmarks/retrieval.py measures retrieval with)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from retrieval import TOPIC_DOCS

    rows = list(csv.DictReader(open(ws / "data/raw/interior_qa.csv", encoding="utf-8")))
    for row in rows:
        row["doc"] = TOPIC_DOCS[re.split(r" 문제| 현상| 에 ", row["질문_1"])[0]]
    with open(ws / "data/raw/interior_qa_docs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def rag_project(tmp_path_factory):
    ws = tmp_path_factory.mktemp("rag") / "ws"
    ws.mkdir()
    make_workspace(ws)
    _sample_with_gold_documents(ws)
    from loraops.orchestration.workspace import write_params

    write_params("params.yaml", small_loop_overrides(*RAG), ws)
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qm", "rag"], cwd=ws, check=True)
    done = subprocess.run([sys.executable, "-m", "loraops.cli", "run"], cwd=ws, capture_output=True, text=True,
                          env={**os.environ, "LORAOPS_API_KEY": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return ws, done.stdout


def test_run_reports_four_arms_and_retrieval_quality(rag_project):
    ws, out = rag_project
    summary = json.loads((ws / "metrics/eval.json").read_text(encoding="utf-8"))
    means = summary["arms"]["means"]["morph_f1"]
    assert set(means) == {"base", "tuned", "base+retrieval", "tuned+retrieval"}
    assert means["tuned+retrieval"] == summary["metrics"]["morph_f1"]["tuned"]  # the gated configuration
    assert means["tuned"] == summary["without_retrieval"]["metrics"]["morph_f1"]["tuned"]
    assert set(summary["without_retrieval"]["slices"]) == {"category"}  # the gold column is not a slice
    gain = summary["arms"]["retrieval_gain"]["morph_f1"]["tuned"]
    assert gain["delta"] == pytest.approx(means["tuned+retrieval"] - means["tuned"], abs=1e-5)
    quality = summary["retrieval"]
    assert quality["n_with_gold"] == summary["n"] and quality["k"] == 1
    assert quality["hit@k"] >= 0.8 and quality["mrr"] == quality["hit@k"]  # k = 1: MRR equals hit@1
    table = (ws / "reports/eval_questions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"tuned_without_retrieval_morph_f1", "base_without_retrieval_answer", "sources"} <= set(table)
    assert "## Retrieval: the four arms" in (ws / "reports/eval.md").read_text(encoding="utf-8")
    assert "the four arms" in out and "registered interior-qa-lora v1" in out


def test_registered_model_carries_the_index_and_answers_with_sources(rag_project):
    ws, _ = rag_project
    env = {**os.environ, "LORAOPS_API_KEY": ""}
    code = ("import json, mlflow; from loraops.registry.tracking import tracking_setup; tracking_setup();"
            "m = mlflow.pyfunc.load_model('models:/interior-qa-lora@production');"
            "out = m.predict(['창문에 물방울이 맺혀요', '욕실 실리콘이 까맣게 변했어요']);"
            "print(json.dumps({'answers': list(out['answer']), 'sources': [list(s) for s in out['sources']]},"
            " ensure_ascii=False))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = json.loads(done.stdout.strip().splitlines()[-1])
    assert predicted["sources"] == [["condensation"], ["silicone-caulking"]]

    (ws / "q.csv").write_text("question\n창문에 물방울이 맺혀요\n욕실 실리콘이 까맣게 변했어요\n", encoding="utf-8")
    ask, batch = loraops_in_one_process(ws, [["ask", "창문에 물방울이 맺혀요"], ["ask", "--file", "q.csv"]], env)
    assert ask.returncode == 0, ask.stderr[-2000:]
    answer, _, sources = ask.stdout.partition("\nsources:\n")
    assert answer.strip() == predicted["answers"][0] and sources.startswith("  [1] condensation: ")
    assert batch.returncode == 0, batch.stderr[-2000:]
    rows = list(csv.DictReader(open(ws / "q.answers.csv", encoding="utf-8")))
    assert [r["answer"] for r in rows] == predicted["answers"]
    assert [r["sources"] for r in rows] == ["condensation", "silicone-caulking"]

    port = free_port()
    proc = start_server([sys.executable, "-m", "loraops.cli", "serve", "--port", str(port)], ws / "serve.log", ws, env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, ws / "serve.log")
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        messages = [{"role": "user", "content": "창문에 물방울이 맺혀요"}]
        reply = client.chat.completions.create(model="interior-qa-lora@production", messages=messages)
        assert reply.choices[0].message.content == predicted["answers"][0]
        assert [s["id"] for s in reply.model_extra["sources"]] == ["condensation"]
        chunks = list(client.chat.completions.create(model="interior-qa-lora@production", messages=messages, stream=True))
        assert [s["id"] for s in chunks[0].model_extra["sources"]] == ["condensation"]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == predicted["answers"][0]
        base = client.chat.completions.create(model="base", messages=messages)
        assert "sources" not in (base.model_extra or {})  # the base model answers without retrieval
    finally:
        stop_server(proc)
