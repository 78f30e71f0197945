"""Stage `augment`: Korean rule variants, the leakage guard judged on Korean cases, filters, the teacher's reply
parsing, bad input, and the teacher path against a real OpenAI-compatible server (`loraops serve`) on loopback."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import REPO, free_port, start_server, stop_server, wait_http
from loraops.core.config import load_params
from loraops.stages import augment


def _prepared(root: Path, *overrides: str):
    from loraops.stages import prepare

    params = load_params(REPO / "params.yaml", [f"data.path={REPO / 'data/raw/interior_qa.csv'}", *overrides])
    prepare.run(params, root)
    return params


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rules():
    return augment.Rules()


def test_ending_rule_reconjugates_korean_question_endings(rules):
    assert rules.endings("벽지 들뜸 관련 하자를 미리 막는 방법이 있나요?") == [
        "벽지 들뜸 관련 하자를 미리 막는 방법이 있습니까?", "벽지 들뜸 관련 하자를 미리 막는 방법이 있어요?"]
    assert rules.endings("곰팡이가 생기면 어떻게 해야 하나요?") == [
        "곰팡이가 생기면 어떻게 해야 합니까?", "곰팡이가 생기면 어떻게 해야 해요?"]
    assert rules.endings("결로의 원인은 무엇인가요?") == ["결로의 원인은 무엇입니까?"]  # not 무엇이나요 / 무엇이어요
    assert rules.endings("마루 소음이 나는 이유가 뭐예요?") == ["마루 소음이 나는 이유가 뭡니까?"]
    assert rules.endings("타일 줄눈이 까매졌어요.") == []  # a statement, not a question
    assert rules.endings("실크벽지와 합지벽지의 차이를 알려주세요") == []  # a request
    assert rules.endings("실크벽지와 합지벽지의 차이?") == []  # no predicate to conjugate


def test_spacing_and_join_read_like_customers():
    text = augment.Rules.spacing("도배지가 들떠서 다시 붙이고 싶어요", random.Random(0))[0]
    assert text.replace(" ", "") == "도배지가들떠서다시붙이고싶어요" and 0 < text.count(" ") < 4
    assert augment.Rules.spacing("결로 원인?", random.Random(0)) == []
    assert augment.join_questions("결로는 왜 생기나요?", "곰팡이는요?") == "결로는 왜 생기나요? 또한, 곰팡이는요?"
    assert augment.join_questions("결로 원인", "곰팡이 제거 방법은?") == "결로 원인? 또한, 곰팡이 제거 방법은?"


def test_leakage_guard_catches_every_variant_of_a_held_out_question_and_keeps_other_topics(tmp_path, rules):
    """Judged on Korean: ending and spacing variants of validation/test questions must all score at or above the
    threshold; the same variants of training questions (other topics, same question templates) must not."""
    params = _prepared(tmp_path)
    train = _rows(tmp_path / "data/prepared/train.jsonl")
    held = _rows(tmp_path / "data/prepared/validation.jsonl") + _rows(tmp_path / "data/prepared/test.jsonl")
    guard = augment.LeakageGuard([r["question"] for r in held], [r["question"] for r in train])
    rng = random.Random(0)
    variants = lambda q: rules.endings(q) + augment.Rules.spacing(q, rng)  # noqa: E731
    threshold = params.augment.leakage_threshold
    held_scores = [guard.nearest(v)[0] for q in sorted({r["question"] for r in held}) for v in variants(q)]
    train_scores = [guard.nearest(v)[0] for q in sorted({r["question"] for r in train}) for v in variants(q)]
    assert len(held_scores) > 100 and min(held_scores) >= threshold
    assert sum(s >= threshold for s in train_scores) / len(train_scores) < 0.01
    # one template, two topics: not a leak; one topic, another ending and no spaces: a leak
    topics = ["벽지 들뜸", "장판", "타일 줄눈", "몰딩 틈새", "방수 공사", "강마루"]
    small = augment.LeakageGuard(["결로 문제를 예방하려면 어떻게 해야 하나요?"],
                                 [f"{t} 문제를 예방하려면 어떻게 해야 하나요?" for t in topics])
    assert small.nearest("벽지 들뜸 문제를 예방하려면 어떻게 해야 하나요?")[0] < threshold
    assert small.nearest("결로문제를 예방하려면 어떻게 해야 합니까?")[0] >= threshold


def test_filters_count_what_they_remove():
    params = load_params(REPO / "params.yaml", ["augment.enabled=true"])
    train = [{"id": "train-0", "group": "G1", "question": "벽지가 들떴어요. 왜 그런가요?", "answer": "습기 때문에 풀이 약해져서 그렇습니다.",
              "category": "마감", "attributes": {}}]
    held = [{"id": "test-0", "group": "G9", "question": "장판 아래에 곰팡이가 생기는 원인은 무엇인가요?", "answer": "바닥 습기 때문입니다.",
             "category": "마감", "attributes": {}}]
    row = lambda q, a, group="G1", **extra: {"group": group, "question": q, "answer": a, "category": "마감",  # noqa: E731
                                             "source": "rule", "origin": "test", "attributes": {}, **extra}
    added = [
        row("벽지가 들떴어요. 왜 그런가요?", "습기 때문에 풀이 약해져서 그렇습니다."),       # exact duplicate of a train row
        row("벽지가 들뜬 이유가 뭔가요?", "습기"),                                          # too short
        row("벽지가 들뜬 이유가 뭔가요?", "습기 " * 150),                                  # too long
        row("벽지가 들뜬 이유가 뭔가요?", "ㅂㅈㄷㄱ ㅂㅈㄷㄱ ㅂㅈㄷㄱ ㅂㅈㄷㄱ ㅂㅈㄷㄱ"),             # degenerate
        row("장판아래에 곰팡이가생기는 원인은 무엇입니까?", "바닥 습기 때문입니다."),          # a test question, respelled
        row("벽지 들뜸 원인은요? 또한, 장판 곰팡이는요?", "둘 다 습기입니다.", origin_groups=["G1", "G9"]),  # a test group
        row("벽지가 들떴어요. 왜 그런가요?", "습기 때문에 풀이 약해져서 그렇습니다!"),     # near duplicate
        row("도배 후 벽지가 들뜨는 이유는 무엇입니까?", "시공 때 벽면이 덜 말라서 풀이 약해졌기 때문입니다."),  # kept
    ]
    from collections import Counter

    counts: Counter = Counter()
    kept = augment.filtered(added, train, held, params.augment, counts)
    assert [r["question"] for r in kept] == ["도배 후 벽지가 들뜨는 이유는 무엇입니까?"]
    assert dict(counts) == {"exact_duplicate": 1, "answer_too_short": 1, "answer_too_long": 1, "degenerate_answer": 1,
                            "close_to_validation_or_test": 1, "shares_group_with_held_out": 1, "near_duplicate": 1}


def test_teacher_replies_are_parsed_or_counted_as_unparseable():
    assert augment.parse_answers("1. 습기 때문입니다.\n2) 환기를 자주 하세요.\n- 제습기를 쓰세요.") == [
        "습기 때문입니다.", "환기를 자주 하세요.", "제습기를 쓰세요."]
    assert augment.parse_answers('["첫 번째 답변", "두 번째 답변"]') == ["첫 번째 답변", "두 번째 답변"]
    assert augment.parse_answers("답변 1: 벽면을 말리세요.") == ["벽면을 말리세요."]
    for garbage in ("", "  \n ...\n", '{"answer": 1}', "[1, 2]"):
        assert augment.parse_answers(garbage) is None, garbage
    reply = "1. 질문: 결로는 왜 생기나요?\n답변: 실내외 온도 차 때문입니다.\n2. 질문: 어떻게 막나요?\n답변: 환기와 단열입니다."
    assert augment.parse_pairs(reply) == [("결로는 왜 생기나요?", "실내외 온도 차 때문입니다."), ("어떻게 막나요?", "환기와 단열입니다.")]
    assert augment.parse_pairs('[{"question": "Q?", "answer": "A."}]') == [("Q?", "A.")]
    assert augment.parse_pairs("결로는 습기 때문입니다.") is None


def test_augment_adds_train_only_rows_marked_with_source_and_off_is_a_byte_copy(tmp_path):
    params = _prepared(tmp_path)
    card = augment.run(params, tmp_path)
    assert not card["enabled"]
    assert (tmp_path / "data/augmented/train.jsonl").read_bytes() == (tmp_path / "data/prepared/train.jsonl").read_bytes()
    on = params.model_copy(update={"augment": params.augment.model_copy(update={"enabled": True})})
    card = augment.run(on, tmp_path)
    rows = _rows(tmp_path / "data/augmented/train.jsonl")
    train = _rows(tmp_path / "data/prepared/train.jsonl")
    held = {r["group"] for name in ("validation", "test") for r in _rows(tmp_path / f"data/prepared/{name}.jsonl")}
    assert rows[: len(train)] == [{**r, "source": "original", "origin": r["source"]} for r in train]
    added = rows[len(train):]
    assert {r["source"] for r in added} == {"rule"} and card["by_source"]["rule"] == len(added) > 200
    assert set(card["by_rule"]) == {"ending", "spacing", "join"}
    assert not held & {g for r in added for g in [r["group"], *r.get("origin_groups", [])]}
    assert {r["group"] for r in added} <= {r["group"] for r in train}
    assert all(r["prompt"] == f"질문: {r['question']}\n답변: " for r in added)
    json.loads((tmp_path / "data/augmented/card.json").read_text(encoding="utf-8"))


def _loraops(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("override, key", [
    ("augment.documents=true", "augment.documents"),
    ("augment.teacher.enabled=true", "augment.teacher.model"),
    ("augment.teacher.prompt=답변을 써 주세요", "augment.teacher.prompt"),
    ("sweep.trials=0", "sweep.trials"),
    ('sweep.space={"lora.rr": {"low": 4, "high": 8}}', "sweep.space.lora.rr"),
    ('sweep.space={"lora.r": {"low": 16, "high": 8}}', "sweep.space.lora.r: empty range"),
    ('sweep.space={"lora.r": {"choices": []}}', "sweep.space.lora.r: choices is empty"),
    ("sweep.objective=cv_val_loss", "sweep.objective"),
    ("train.cv_folds=1", "train.cv_folds"),
])
def test_bad_augment_and_sweep_settings_exit_2_naming_the_key(tmp_path, override, key):
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    (tmp_path / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    command = "sweep" if override.startswith("sweep") else "augment"
    out = _loraops(command, "--set", override, cwd=tmp_path)
    assert out.returncode == 2 and key in out.stderr, out.stderr
    assert not (tmp_path / "data/augmented").exists()


def test_an_unreachable_teacher_is_a_clear_error_after_bounded_retries_and_nothing_is_written(tmp_path):
    _prepared(tmp_path)
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    out = _loraops("augment", "--set", "augment.enabled=true", "--set", "augment.teacher.enabled=true",
                   "--set", f"augment.teacher.base_url={url}", "--set", "augment.teacher.model=teacher",
                   "--set", "augment.teacher.retries=1", "--set", "augment.teacher.timeout_seconds=5",
                   "--set", f"augment.teacher.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert url in out.stderr and "no answer after 1 retries" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "data/augmented").exists()


@contextmanager
def _serve(root: Path):
    port = free_port()
    log = root.parent / f"teacher-{port}.log"
    proc = start_server([sys.executable, "-m", "loraops.cli", "serve", "--port", str(port)], log, root,
                        {**os.environ, "LORAOPS_API_KEY": ""})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.integration
def test_teacher_through_a_real_openai_compatible_server_is_cached_and_counts_unparseable_replies(served_project, tmp_path):
    """`loraops serve` of the tiny production model is the teacher (a real endpoint on loopback): it answers
    training questions (rows with source teacher) and is asked for Q&A pairs from document chunks, which the tiny
    model cannot write in the asked format (unparseable, skipped and counted). A rerun is served from the cache."""
    work = tmp_path / "ws"
    work.mkdir()
    _prepared(work)
    for name in ("params.yaml", "dvc.yaml"):
        (work / name).write_bytes((REPO / name).read_bytes())
    import shutil

    shutil.copytree(REPO / "data/docs", work / "data/docs")
    with _serve(served_project) as url:
        sets = ["augment.enabled=true", "augment.teacher.enabled=true", f"augment.teacher.base_url={url}",
                "augment.teacher.model=interior-qa-lora@production", "augment.teacher.prompt='{question}'",
                "augment.teacher.max_questions=6", "augment.teacher.max_tokens=48", "augment.teacher.answers_per_question=2",
                "augment.documents=true", f"augment.teacher.cache_dir={tmp_path / 'cache'}", "augment.rules=[]"]
        args = [a for s in sets for a in ("--set", s)]
        first = _loraops("augment", *args, cwd=work, env={"OPENAI_API_KEY": "unused-on-loopback"})
        assert first.returncode == 0, first.stderr[-2000:]
        card = json.loads((work / "data/augmented/card.json").read_text(encoding="utf-8"))
        rows = (work / "data/augmented/train.jsonl").read_bytes()
        assert card["teacher"]["calls"] == 12 and card["teacher"]["cached"] == 0  # 6 questions + 6 document chunks
        asked = card["proposed"]["teacher"] + card["unparseable_replies"].get("teacher", 0)
        assert card["proposed"]["teacher"] > 0 and asked >= 6
        assert card["proposed"]["document"] + card["unparseable_replies"].get("document", 0) > 0
        added = [r for r in _rows(work / "data/augmented/train.jsonl") if r["source"] != "original"]
        assert all(r["source"] in ("teacher", "document") for r in added)
        assert all(r["origin"].startswith("teacher:interior-qa-lora@production") for r in added if r["source"] == "teacher")
        again = _loraops("augment", *args, cwd=work)
    card = json.loads((work / "data/augmented/card.json").read_text(encoding="utf-8"))
    assert again.returncode == 0 and card["teacher"]["calls"] == 0 and card["teacher"]["cached"] == 12
    assert (work / "data/augmented/train.jsonl").read_bytes() == rows


@pytest.mark.slow
def test_a_local_transformers_teacher_answers_and_is_cached(served_project, tmp_path):
    """backend local: a transformers model from a directory (here the served project's tiny base) is the teacher."""
    from loraops.core.config import TeacherSection

    cfg = TeacherSection(enabled=True, backend="local", model=str(served_project / "models/base"), max_tokens=16,
                         temperature=0.7, cache_dir=str(tmp_path / "cache"))
    teacher = augment.Teacher(cfg, seed=42)
    reply = teacher.ask("질문: 벽지에 곰팡이가 생겼어요\n답변: ")
    assert isinstance(reply, str) and teacher.calls == 1
    again = augment.Teacher(cfg, seed=42)
    assert again.ask("질문: 벽지에 곰팡이가 생겼어요\n답변: ") == reply and again.calls == 0 and again.cached == 1
    assert augment.Teacher(cfg, seed=7).key("q") != again.key("q")  # the seed decides a sampled reply: part of the key
