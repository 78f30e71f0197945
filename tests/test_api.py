"""The serving engine's per-row text handling: what a stream may show before the answer is settled."""

from __future__ import annotations

import pytest

from loraops.modeling.generation import clean_answer
from loraops.serving.engine import Job, _advance

PIECES = {1: " 습기", 2: "가 ", 3: "원인", 4: "입니다.", 5: "\n질", 6: "문:", 7: " 다음", 8: "\ufffd", 9: "\n"}


class _Tok:
    def decode(self, tokens, skip_special_tokens=True):
        return "".join(PIECES[t] for t in tokens)


def _job(max_tokens=32, stops=("\n질문:",), stop_ids=(0,)):
    events = []
    return Job(prompt="p", version=None, max_tokens=max_tokens, stops=list(stops), temperature=0.0, top_p=1.0,
               sink=events.append, stop_ids=list(stop_ids)), events


def _stream(tokens, **kwargs):
    job, events = _job(**kwargs)
    for n in range(1, len(tokens) + 1):
        if job.finish is None:
            _advance(job, tokens[:n], _Tok())
    if job.finish is None:
        _advance(job, tokens, _Tok(), final=True)
    return job, [e[1] for e in events if e[0] == "delta"]


def test_a_stop_string_is_never_shown_and_the_stream_adds_up_to_the_answer():
    tokens = [1, 2, 3, 4, 5, 6, 7]
    job, deltas = _stream(tokens)
    assert job.finish == "stop" and job.text == clean_answer(_Tok().decode(tokens), ["\n질문:"]) == "습기가 원인입니다."
    assert "".join(deltas) == job.text and all("질" not in d for d in deltas)


def test_torn_characters_and_trailing_spaces_wait_for_the_next_token():
    job, events = _job()
    _advance(job, [1, 2, 8], _Tok())
    assert job.sent == "습기가"  # the space and the torn character are held back
    _advance(job, [1, 2, 8, 3], _Tok())
    assert job.sent == "습기가 원인"  # an undecodable character inside the text is dropped, as `ask` drops it


def test_end_of_text_end_of_turn_and_max_tokens_finish_a_row():
    job, _ = _stream([1, 2, 0, 3])
    assert job.finish == "stop" and job.text == "습기가" and job.tokens == 2
    job, _ = _stream([1, 2, 9, 3, 0], stop_ids=(0, 9))  # an end-of-turn token that is not EOS ends the row too
    assert job.finish == "stop" and job.text == "습기가" and job.tokens == 2
    job, _ = _stream([1, 2, 3, 4], max_tokens=2)
    assert job.finish == "length" and job.text == "습기가" and job.tokens == 2


def test_the_answer_as_generated_keeps_what_the_reader_is_spared():
    job, deltas = _stream([1, 2, 8, 3, 4])
    assert "\ufffd" in job.raw and "\ufffd" not in job.text and "".join(deltas) == job.text == "습기가 원인입니다."


@pytest.mark.slow
def test_lora_dora_and_base_requests_in_one_batch_answer_as_they_do_alone(served_project, tmp_path):
    """peft cannot mix DoRA adapters in one batch: such a batch is answered adapter by adapter, same answers."""
    import threading

    from peft import LoraConfig, get_peft_model

    from loraops.core.config import ModelSection
    from loraops.modeling.model import load_base
    from loraops.serving.catalog import Version, base_identity
    from loraops.serving.engine import Engine

    base_dir = str(served_project / "models/base")
    cfg = ModelSection(base=base_dir)
    spec = {"base": {"configured": "tiny"}, "template": "{question}", "generation": {"max_new_tokens": 8, "stop_strings": []}}
    versions = []
    for name, dora in (("lora", False), ("dora", True)):
        model = get_peft_model(load_base(base_dir, cfg, "cpu"), LoraConfig(r=4, lora_alpha=8, use_dora=dora,
                                                                          init_lora_weights=False, target_modules="all-linear"))
        model.save_pretrained(tmp_path / name)
        versions.append(Version(name, "1", str(tmp_path / name), spec, None))
    engine = Engine(base_dir, cfg, base_dir, base_identity(spec, None), window_s=0.5)
    jobs = [(v, f"질문 {i}") for i, v in enumerate([*versions, None, *versions])]
    alone = [engine.answer(q, v, 8, [])[0] for v, q in jobs]
    together: list = [None] * len(jobs)

    def ask(i: int) -> None:
        together[i] = engine.answer(jobs[i][1], jobs[i][0], 8, [])[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and len(set(alone[:3])) == 3  # three different models, each as it answers alone


def test_decoding_is_incremental_and_equals_decoding_the_whole_answer():
    """Each step decodes the few tokens since the last settled character, and the text equals a full decode — with a
    byte-level BPE whose characters span tokens, on real text and on random ids as an untrained model emits them."""
    import random
    from pathlib import Path

    from bases import _tokenizer, sample_texts
    from loraops.serving.engine import _decoded

    texts = sample_texts(Path(__file__).resolve().parents[1])
    tok = _tokenizer(texts[:400], "qwen2_instruct", 600)
    widths: list[int] = []
    decode = tok.decode
    tok.decode = lambda ids, **kw: (widths.append(len(ids)), decode(ids, **kw))[1]
    rng = random.Random(0)
    long = tok(" ".join(texts[:40]), add_special_tokens=False)["input_ids"][:400]
    for seq in (long, *[[rng.randrange(len(tok)) for _ in range(60)] for _ in range(20)]):
        job, _ = _job(max_tokens=10**6)
        widths.clear()
        for n in range(1, len(seq) + 1):
            text = _decoded(job, seq[:n], tok)
        assert text == decode(seq, skip_special_tokens=True)
        assert max(widths) < 40, max(widths)  # not the answer so far (400 tokens for the first sequence)
