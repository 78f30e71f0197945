"""Degenerate-answer detectors on Korean: each flags its kind of garbage and none flags real answers."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import REPO
from loraops.judge import degenerate as d
from loraops.judge.validity import BUILTIN

REF = "벽지가 들뜨는 것은 풀칠이 고르지 않았거나 벽면에 습기가 남았기 때문입니다."
# What the untrained tiny base emitted in this repo (decoded from byte-level BPE, U+FFFD included).
UNTRAINED = "\ufffd다 벽체\ufffd\ufffd\ufffd 묻힌\ufffd\ufffd 물을 넀톛\ufffd했기 \ufffd\ufffd\ufffd\ufffd했기 맞지 맞지 맞지 맞지 맞지"


@pytest.mark.parametrize("answer, kind", [
    ("", "empty"), ("   ", "empty"), ("\ufffd.", "empty"), ("?!", "empty"),
    (UNTRAINED, "undecodable"), ("벽지\x07가 들뜹니다", "undecodable"),
    ("뙇벽뙇 넀들똠 뜳것놬 뙇대똠 놬풀쌰", "broken syllables"),
    ("맞지 맞지 맞지 맞지 맞지", "repetition loop"), ("닥닥닥닥닥닥닥닥", "repetition loop"),
    ("습기 때문입니다. " * 5, "repetition loop"),
    ("채우는 깨지는 주입한 먼저 것이니 수평이 닦아 물이 합지 없습니다. 급격한 스며든 빠르게 공기를", "word salad"),
    ("The wallpaper lifts because of humidity.", "wrong script"), ("ㅂㅈㄷㄱ ㅋㅋ P G0 xq", "wrong script"),
    ("벽" * 1200, "repetition loop"), ("벽", "absurd length"),
])
def test_each_kind_of_garbage_is_flagged(answer, kind):
    reason = d.detect(answer, REF)
    assert reason is not None and reason.startswith(kind), reason


def test_a_long_varied_answer_is_absurd_only_past_the_limit():
    long = " ".join(f"{i}번째 항목은 벽면 상태를 확인하는 절차입니다." for i in range(200))
    assert d.absurd_length(long, "짧은 답입니다.").startswith("absurd length")
    assert d.absurd_length(long[:150], "짧은 답입니다.") is None


def test_a_trailing_replacement_char_is_a_cut_not_a_broken_model():
    """max_new_tokens can stop inside a multi-byte character; only that last U+FFFD is forgiven."""
    assert d.detect("습기가 남아 접착력이 떨어졌기 때문\ufffd", REF) is None
    assert d.clean("습기\ufffd가 남아\ufffd") == ("습기가 남아", 2)


def test_english_reference_allows_english_answers():
    assert d.detect("It lifts because of humidity.", "Wallpaper lifts because of humidity.") is None


def test_no_real_korean_text_is_flagged():
    """Every question and answer of the sample data and every probe text is real Korean: none may be flagged."""
    texts = []
    with open(REPO / "data/raw/interior_qa.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            texts += [(v, row["답변_1"]) for k, v in row.items() if k.startswith(("질문", "답변")) and v]
    for line in BUILTIN.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        texts += [(entry[k], entry["reference"]) for k in ("reference", "paraphrase", "same_topic")]
    flagged = [(text, d.detect(text, ref)) for text, ref in texts if d.detect(text, ref)]
    assert len(texts) > 1000 and flagged == []
