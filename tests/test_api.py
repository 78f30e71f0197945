"""The serving engine's per-row text handling: what a stream may show before the answer is settled."""

from __future__ import annotations

from loraops.api import Job, _advance
from loraops.evaluate import clean_answer

PIECES = {1: " 습기", 2: "가 ", 3: "원인", 4: "입니다.", 5: "\n질", 6: "문:", 7: " 다음", 8: "\ufffd", 9: "\n"}


class _Tok:
    def decode(self, tokens, skip_special_tokens=True):
        return "".join(PIECES[t] for t in tokens)


def _job(max_tokens=32, stops=("\n질문:",)):
    events = []
    return Job(prompt="p", version=None, max_tokens=max_tokens, stops=list(stops), temperature=0.0, top_p=1.0,
               sink=events.append), events


def _stream(tokens, **kwargs):
    job, events = _job(**kwargs)
    for n in range(1, len(tokens) + 1):
        if job.finish is None:
            _advance(job, tokens[:n], _Tok(), eos=0)
    if job.finish is None:
        _advance(job, tokens, _Tok(), eos=0, final=True)
    return job, [e[1] for e in events if e[0] == "delta"]


def test_a_stop_string_is_never_shown_and_the_stream_adds_up_to_the_answer():
    tokens = [1, 2, 3, 4, 5, 6, 7]
    job, deltas = _stream(tokens)
    assert job.finish == "stop" and job.text == clean_answer(_Tok().decode(tokens), ["\n질문:"]) == "습기가 원인입니다."
    assert "".join(deltas) == job.text and all("질" not in d for d in deltas)


def test_torn_characters_and_trailing_spaces_wait_for_the_next_token():
    job, events = _job()
    _advance(job, [1, 2, 8], _Tok(), eos=0)
    assert job.sent == "습기가"  # the space and the torn character are held back
    _advance(job, [1, 2, 8, 3], _Tok(), eos=0)
    assert job.sent == "습기가 원인"  # an undecodable character inside the text is dropped, as `ask` drops it


def test_end_of_text_and_max_tokens_finish_a_row():
    job, _ = _stream([1, 2, 0, 3])
    assert job.finish == "stop" and job.text == "습기가" and job.tokens == 2
    job, _ = _stream([1, 2, 3, 4], max_tokens=2)
    assert job.finish == "length" and job.text == "습기가" and job.tokens == 2


def test_the_answer_as_generated_keeps_what_the_reader_is_spared():
    job, deltas = _stream([1, 2, 8, 3, 4])
    assert "\ufffd" in job.raw and "\ufffd" not in job.text and "".join(deltas) == job.text == "습기가 원인입니다."
