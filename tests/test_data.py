"""Readers for every format, valid-but-awkward input, and every bad input with the message it must give."""

from __future__ import annotations

import json
import unicodedata

import pytest

from helpers import REPO
from loraops.core.config import DataSection, load_params
from loraops.core.readers import DataError, read_records
from loraops.core.results import DataCard
from loraops.core.text import clean_text
from loraops.stages import prepare

WIDE_HEADER = "id,질문_1,질문_2,category,답변_1,답변_2\n"


def _wide(tmp_path, body: str, name: str = "d.csv", header: str = WIDE_HEADER, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes((header + body).encode(encoding))
    return path


def test_wide_expands_phrasings_times_answers(tmp_path):
    path = _wide(tmp_path, "A1,벽지가 들떠요?,벽지 들뜸 원인은?,마감하자,습기 때문입니다.,풀칠 부족입니다.\n")
    records, encoding = read_records(path, DataSection())
    assert encoding == "utf-8" and len(records) == 4
    assert {r.group for r in records} == {"A1"} and {r.category for r in records} == {"마감하자"}


def test_sample_dataset_shape():
    records, _ = read_records(REPO / "data/raw/interior_qa.csv", DataSection())
    groups = {r.group for r in records}
    assert len(groups) >= 100 and len({r.category for r in records}) >= 5
    assert len(records) == len(groups) * 2 * 5


@pytest.mark.parametrize("fmt,name,content,expected", [
    ("qa", "d.jsonl", '{"id": "1", "question": "질문?", "answer": "답", "category": "c"}\n', 1),
    ("qa", "d.csv", "question,answer\n질문?,답\n다른 질문?,답2\n", 2),
    ("alpaca", "d.json", json.dumps([{"instruction": "설명해", "input": "벽지", "output": "답"}], ensure_ascii=False), 1),
    ("alpaca", "d.jsonl", '{"instruction": "설명해", "output": "답"}\n', 1),
    ("chat", "d.jsonl", json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "질문"},
                                                 {"role": "assistant", "content": "답"}]}, ensure_ascii=False) + "\n", 1),
])
def test_other_formats(tmp_path, fmt, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    category = "category" if "category" in content else None
    records, _ = read_records(path, DataSection(format=fmt, category_column=category))
    assert len(records) == expected and records[0].answer


@pytest.mark.parametrize("fmt,name,content", [
    ("qa", "d.csv", "question,answer,categroy\n질문?,답,c\n"),
    ("alpaca", "d.jsonl", '{"instruction": "설명해", "output": "답", "kind": "c"}\n'),
    ("wide", "d.csv", "id,질문_1,cat,답변_1\nA1,질문?,c,답\n"),
])
def test_missing_category_column_is_an_error_naming_the_key(tmp_path, fmt, name, content):
    """A misspelt category column would silently make one category "all" and an unstratified split."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="data.category_column 'category' is not a column.*null for no categories"):
        read_records(path, DataSection(format=fmt))


def test_parquet_qa(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"q": ["질문?"], "a": ["답"]}).to_parquet(path)
    records, _ = read_records(path, DataSection(format="qa", question_column="q", answer_column="a", category_column=None))
    assert records[0].question == "질문?" and records[0].category == "all"


def test_awkward_but_valid_input(tmp_path):
    nfd = unicodedata.normalize("NFD", "벽지가 들떠요?")
    long_answer = "가" * 3000
    body = f'A1,{nfd},"두 줄\r\n질문",c,"여러 줄\r\n답변입니다.",{long_answer}\r\n'
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (WIDE_HEADER.replace("\n", "\r\n") + body).encode("utf-8"))
    records, encoding = read_records(path, DataSection())
    assert encoding == "utf-8" and len(records) == 4
    cleaned, report = prepare.clean(records, DataSection(max_answer_chars=100))
    assert cleaned[0].question == "벽지가 들떠요?"  # NFC
    assert "여러 줄\n답변입니다." in {r.answer for r in cleaned}
    assert report["truncated"] == 2 and max(len(r.answer) for r in cleaned) == 100
    dropped, report = prepare.clean(records, DataSection(max_answer_chars=100, length_policy="drop"))
    assert report["dropped_long"] == 2 and len(dropped) == 2


def test_category_column_null_means_one_category(tmp_path):
    path = _wide(tmp_path, "A1,질문?,,답\n", header="id,질문_1,질문_2,답변_1\n")
    records, _ = read_records(path, DataSection(category_column=None))
    assert records[0].category == "all"


def test_legacy_korean_encoding_is_detected(tmp_path):
    path = _wide(tmp_path, "A1,벽지가 들떠요?,,마감하자,습기 때문입니다.,\n", encoding="cp949")
    records, encoding = read_records(path, DataSection())
    assert encoding == "cp949" and records[0].answer == "습기 때문입니다."


@pytest.mark.parametrize("body,header,match", [
    ("A1,질문?,,c,,\n", WIDE_HEADER, r"d.csv: line 2 \(id A1\): no usable answer"),
    ("A1,질문?,,c,답,\nA1,질문?,,c,다른 답,\n", WIDE_HEADER, r"line 3: duplicate id 'A1' \(first at line 2\) with different content"),
    ("A1,질문?,c,답\n", "id,질문_1,category,answer\n", r"missing column\(s\) 답변_1, 답변_2, … \(data.answer_prefix\)"),
    ("", WIDE_HEADER, "header only"),
    ("A1,질문?,,c,답,x,extra\n", WIDE_HEADER, "line 2: more fields than the 6 header columns"),
])
def test_bad_wide_rows(tmp_path, body, header, match):
    with pytest.raises(DataError, match=match):
        read_records(_wide(tmp_path, body, header=header), DataSection())


def test_missing_id_column(tmp_path):
    path = _wide(tmp_path, "질문?,답\n", header="질문_1,답변_1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) id"):
        read_records(path, DataSection())


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    latin = tmp_path / "latin.csv"
    latin.write_bytes("question,answer\ncafé,olé\n".encode("latin-1"))
    cases = [(empty, DataSection(), "empty.csv: file is empty"),
             (binary, DataSection(), "bin.csv: looks like a binary file"),
             (bad_jsonl, DataSection(format="qa"), "bad.jsonl: line 2: malformed JSON"),
             (latin, DataSection(format="qa"), "latin.csv: not UTF-8 .* set data.encoding"),
             (tmp_path / "missing.csv", DataSection(), "data.path: .*missing.csv does not exist")]
    for path, cfg, match in cases:
        with pytest.raises(DataError, match=match):
            read_records(path, cfg)


def test_split_keeps_groups_together_and_is_deterministic():
    params = load_params(REPO / "params.yaml")
    records, _ = read_records(REPO / "data/raw/interior_qa.csv", params.data)
    rows, _ = prepare.build_splits(records, params.data, seed=7)
    again, _ = prepare.build_splits(records, params.data, seed=7)
    assert rows == again
    owners = {}
    for split, items in rows.items():
        for row in items:
            assert owners.setdefault(row["group"], split) == split
    test_categories = {r["category"] for r in rows["test"]}
    assert test_categories == {r.category for r in records}  # stratified: every category is tested
    assert rows["train"][0]["prompt"].startswith("질문: ") and rows["train"][0]["prompt"].endswith("답변: ")


def test_template_with_attribute_and_unknown_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer,age\n" + "".join(f"질문 {i}?,답 {i},20대\n" for i in range(12)), encoding="utf-8")
    cfg = DataSection(format="qa", category_column=None, attribute_columns=["age"], template="[{age}] {question}\n")
    records, _ = read_records(path, cfg)
    rows, _ = prepare.build_splits(records, cfg, seed=1)
    assert rows["train"][0]["prompt"].startswith("[20대] ")
    with pytest.raises(DataError, match=r"data.template uses \{tone\}"):
        prepare.build_splits(records, DataSection(format="qa", template="{tone} {question}"), seed=1)


def test_run_writes_nothing_on_failure(tmp_path):
    params = load_params(REPO / "params.yaml", [f"data.path={tmp_path / 'bad.csv'}"])
    (tmp_path / "bad.csv").write_text(WIDE_HEADER + "A1,질문?,,c,,\n", encoding="utf-8")
    with pytest.raises(DataError):
        prepare.run(params, root=tmp_path)
    assert not (tmp_path / "data").exists()


def test_run_writes_splits_and_card(tmp_path):
    params = load_params(REPO / "params.yaml", [f"data.path={REPO / 'data/raw/interior_qa.csv'}"])
    card = prepare.run(params, root=tmp_path)
    out = tmp_path / "data/prepared"
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    first = json.loads((out / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert {"id", "group", "question", "answer", "category", "prompt"} <= set(first)
    assert sum(card.pairs.values()) == card.source["records_read"]
    assert DataCard.read(tmp_path) == card  # written and read back as the same type


def test_cuts_fall_on_a_word_and_say_which_key_and_invisible_characters_are_cleaned():
    answer = "벽지가 들뜨면 풀을 다시 바릅니다. 습기가 원인이면 환기를 먼저 합니다 그리고 말립니다"
    cut = prepare.cut_at_word(answer, 40)
    assert len(cut) <= 40 and answer.startswith(cut) and cut.endswith(("다.", "다")) and answer[len(cut)] in " "
    assert prepare.cut_at_word("가" * 50, 40) == "가" * 40  # one word fills it: cut there
    note = prepare.length_note({"truncated": 163, "longest_answer": 9000}, DataSection(max_answer_chars=1024))
    assert "163 pair(s)" in note and "data.max_answer_chars=1024" in note and "9,000" in note
    assert prepare.length_note({"truncated": 0, "dropped_long": 0}, DataSection()) is None
    assert clean_text("벽\u200b지가\u00ad 들\ufeff떴어요\u2028줄") == "벽지가 들떴어요\n줄"


def test_folders_written_aside_get_the_usual_mode_not_0700(tmp_path):
    """atomic_dir writes into a temporary folder (mkdtemp: 0700) then renames it: the export, adapter and index
    folders must be readable by whoever the umask allows, as any folder the user makes."""
    import os

    from loraops.core.utils import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert oct((tmp_path / "export").stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("breaker", ["\u2028", "\u2029", "\u0085", "\n", "\r\n"])
def test_a_correction_with_any_line_separator_round_trips_through_the_feedback_file(tmp_path, breaker):
    """The demo appends corrections as JSON Lines; loraops reads them back as `qa` data, one record a line."""
    from loraops.serving.demo import append_feedback

    path = tmp_path / "corrections.jsonl"
    rows = [{"question": f"벽지가{breaker}들떴어요", "answer": f"풀이 부족{breaker}했습니다.", "category": "벽지"},
            {"question": "곰팡이", "answer": "환기하세요.", "category": "벽지"}]
    for row in rows:
        append_feedback(row, path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # no line break a text tool sees inside a record
    records, _ = read_records(path, DataSection(path=str(path), format="qa", id_column=None))
    assert [(r.question, r.answer) for r in records] == [(row["question"], row["answer"]) for row in rows]
