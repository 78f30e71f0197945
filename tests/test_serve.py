"""`loraops serve` on loopback, called with the official `openai` client: models, chat, completions, streaming,
OpenAI-shaped errors, answers equal to the registered pyfunc model's, alias moves without a restart,
concurrent requests batched to the same answers, API key and a full queue."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from helpers import free_port, start_server, stop_server, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "interior-qa-lora"
QUESTIONS = ["벽지에 곰팡이가 생기는 원인은 무엇인가요?", "장판이 들뜨면 어떻게 해야 하나요?",
             "도배 후 벽지가 우는 이유는?", "타일 줄눈이 검게 변했어요.", "실크벽지와 합지벽지의 차이는?",
             "결로를 막으려면 어떻게 하나요?", "몰딩 틈이 벌어졌어요.", "욕실 실리콘에 곰팡이가 폈어요."]


@contextmanager
def _server(root, *args, key: str = ""):
    port = free_port()
    log = root.parent / f"serve-{port}.log"
    proc = start_server([sys.executable, "-m", "loraops.cli", "serve", "--port", str(port), *args], log, root,
                        {**os.environ, "LORAOPS_API_KEY": key})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(served_project):
    with _server(served_project) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)


def _chat(client, model: str, question: str, **kwargs) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)
    return out.choices[0].message.content


def test_models_list_base_aliases_and_versions(client):
    ids = {m.id for m in client.models.list()}
    assert {"base", f"{NAME}@production", f"{NAME}@candidate", f"{NAME}/1", f"{NAME}/2", f"{NAME}/3"} <= ids
    assert client.models.retrieve(f"{NAME}@production").root == f"{NAME}/1"


def test_chat_answers_equal_the_registered_pyfunc_models(client, served_project, monkeypatch):
    import mlflow

    from loraops.registry.tracking import tracking_setup

    monkeypatch.chdir(served_project)
    tracking_setup(served_project)
    for alias, version in (("production", "1"), ("candidate", "3")):
        expected = mlflow.pyfunc.load_model(f"models:/{NAME}@{alias}").predict(QUESTIONS[:3])
        assert [_chat(client, f"{NAME}@{alias}", q) for q in QUESTIONS[:3]] == expected
        assert _chat(client, f"{NAME}/{version}", QUESTIONS[0]) == expected[0]
    assert _chat(client, f"{NAME}@production", QUESTIONS[0]) != _chat(client, "base", QUESTIONS[0])


def test_stream_is_server_sent_events_ending_in_done_and_adds_up_to_the_answer(client, server):
    whole = _chat(client, f"{NAME}@production", QUESTIONS[1])
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=f"{NAME}@production", messages=[{"role": "user", "content": QUESTIONS[1]}], stream=True)]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    chunks = list(client.chat.completions.create(model=f"{NAME}@production", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": QUESTIONS[1]}]))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with httpx.stream("POST", f"{server}/chat/completions", timeout=60, json={
            "model": "base", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": QUESTIONS[1]}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_completions_continue_a_raw_prompt_within_max_tokens(client):
    out = client.completions.create(model=f"{NAME}@production", prompt=f"질문: {QUESTIONS[0]}\n답변: ", max_tokens=5)
    assert out.usage.completion_tokens <= 5 and out.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=f"{NAME}@production", prompt=f"질문: {QUESTIONS[0]}\n답변: ", max_tokens=5, stream=True))
    assert streamed == out.choices[0].text


def test_unknown_models_and_bad_bodies_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "no-such-model@production", "질문")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        _chat(client, f"{NAME}/99", "질문")
    for odd in (f"{NAME}/01", f"{NAME}/ 1", f"{NAME}/１"):  # one id per version, echoed as sent only when canonical
        with pytest.raises(openai.NotFoundError):
            _chat(client, odd, "질문")
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, f"{NAME}@production", "질문", max_tokens=100_000)
    assert err.value.code == "max_tokens_too_large"
    for body in ({"model": "base"}, {"model": "base", "messages": []}, {"model": "base", "messages": [{"role": "user"}]},
                 {"model": "base", "messages": [{"role": "user", "content": "q"}], "temperature": 5}):
        r = httpx.post(f"{server}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    for extra in ({"logprobs": True}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"n": 2}):
        r = httpx.post(f"{server}/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "q"}],
                                                          **extra}, timeout=30)
        assert r.status_code == 400, (extra, r.text)  # refused, never silently ignored
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    # the tiny default trains with the plain template: a system turn or earlier turns have no place in its prompt
    for messages in ([{"role": "system", "content": "존댓말로 답하세요."}, {"role": "user", "content": QUESTIONS[0]}],
                     [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "네."},
                      {"role": "user", "content": QUESTIONS[1]}]):
        r = httpx.post(f"{server}/chat/completions", json={"model": f"{NAME}@production", "messages": messages}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_messages", r.text
        assert "plain prompt template" in r.json()["error"]["message"] and "--last-user-message-only" in r.text


def test_huge_bodies_undecodable_text_and_odd_values_are_refused_without_holding_anyone(client, server):
    import json
    import threading
    import time

    sent: dict = {}

    def huge() -> None:
        body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "벽" * 3_500_000}]})
        sent["r"] = httpx.post(f"{server}/chat/completions", content=body.encode(), timeout=60,
                               headers={"content-type": "application/json"})

    thread = threading.Thread(target=huge)
    thread.start()
    started = time.perf_counter()
    assert httpx.get(f"{server.removesuffix('/v1')}/health", timeout=5).status_code == 200
    assert time.perf_counter() - started < 1.0
    thread.join()
    assert sent["r"].status_code == 413 and sent["r"].json()["error"]["code"] == "body_too_large"
    # a lone surrogate is valid JSON but no text: 400 naming where, and the request beside it is answered
    bad = b'{"model": "base", "max_tokens": 4, "messages": [{"role": "user", "content": "\\ud800 \xeb\xb2\xbd"}]}'
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(httpx.post, f"{server}/chat/completions", content=bad, timeout=60,
                              headers={"content-type": "application/json"})
        fine = pool.submit(_chat, client, f"{NAME}@production", QUESTIONS[2], max_tokens=8)
        assert refused.result().status_code == 400 and "surrogate" in refused.result().json()["error"]["message"]
        assert isinstance(fine.result(), str)
    # a temperature too small to sample with is greedy; a long model id is cut in the error
    assert _chat(client, f"{NAME}@production", QUESTIONS[0], temperature=1e-40, max_tokens=8) == \
        _chat(client, f"{NAME}@production", QUESTIONS[0], max_tokens=8)
    r = httpx.post(f"{server}/chat/completions", json={"model": "m" * 10_000, "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400


def test_a_client_that_goes_away_is_not_answered_past_the_next_step(server):
    """A non-streaming request whose client disconnects stops generating (no one would read it)."""
    import time

    health = server.removesuffix("/v1") + "/health"
    before = httpx.get(health).json()["cancelled"]
    body = {"model": "base", "prompt": "질문: 벽지가 들떴어요\n답변: ", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/completions", json=body, timeout=1.0)
    gone = time.perf_counter()
    while httpx.get(health).json()["generating"] and time.perf_counter() - gone < 5:
        time.sleep(0.02)
    stopped = time.perf_counter() - gone
    assert httpx.get(health).json()["cancelled"] == before + 1 and stopped < 1.0, stopped


def test_a_short_request_does_not_wait_for_a_long_one(client, server):
    """Batches take turns a few tokens at a time: an 8-token answer asked while a 1,000-token one is being generated
    comes back long before that one ends, and the same as asked alone."""
    import threading
    import time

    alone = _chat(client, f"{NAME}@production", QUESTIONS[3], max_tokens=8)
    long: dict = {}

    def long_request() -> None:
        started = time.perf_counter()
        httpx.post(f"{server}/completions", json={"model": "base", "prompt": "질문: 벽지\n답변: ", "max_tokens": 1000,
                                                  "ignore_eos": True}, timeout=120)
        long["took"] = time.perf_counter() - started

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)  # the long answer is under way
    started = time.perf_counter()
    short = _chat(client, f"{NAME}@production", QUESTIONS[3], max_tokens=8)
    took = time.perf_counter() - started
    thread.join()
    assert short == alone and took < long["took"] / 3, (took, long)


def test_concurrent_requests_are_batched_to_the_same_answers(client):
    one_by_one = [_chat(client, f"{NAME}@production", q) for q in QUESTIONS]
    mixed = [(f"{NAME}@production" if i % 2 else f"{NAME}@candidate", q) for i, q in enumerate(QUESTIONS)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: _chat(client, f"{NAME}@production", q), QUESTIONS))
        mixed_answers = list(pool.map(lambda mq: _chat(client, *mq), mixed))
    assert together == one_by_one
    assert [a for (m, _), a in zip(mixed, mixed_answers) if m.endswith("production")] == one_by_one[1::2]


def test_an_alias_move_is_served_without_a_restart(client, served_project, monkeypatch):
    import mlflow

    from loraops.registry.tracking import tracking_setup

    monkeypatch.chdir(served_project)
    tracking_setup(served_project)
    registry = mlflow.MlflowClient()
    v3 = _chat(client, f"{NAME}/3", QUESTIONS[2])
    registry.set_registered_model_alias(NAME, "production", "3")
    try:
        assert _chat(client, f"{NAME}@production", QUESTIONS[2]) == v3
        assert client.models.retrieve(f"{NAME}@production").root == f"{NAME}/3"
    finally:
        registry.set_registered_model_alias(NAME, "production", "1")


def test_api_key_and_a_full_queue(served_project):
    with _server(served_project, "--queue-size", "1", "--max-batch", "1", "--last-user-message-only", key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            _chat(openai.OpenAI(base_url=url, api_key="wrong", max_retries=0), "base", "질문")
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            try:
                return _chat(keyed, f"{NAME}@production", q, max_tokens=32)
            except openai.RateLimitError as exc:
                assert exc.code == "queue_full" and int(exc.response.headers["retry-after"]) >= 1
                return "429"

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, QUESTIONS * 2))
        assert "429" in answers and any(a != "429" for a in answers)
        for path in ("/docs", "/openapi.json", "/v1/models"):  # with a key, nothing but /health is open
            assert httpx.get(url.removesuffix("/v1") + path if path != "/v1/models" else url + "/models").status_code == 401
        assert httpx.get(url.removesuffix("/v1") + "/openapi.json", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # started with --last-user-message-only: a plain-template version answers the last user message of a chat
        chat = keyed.chat.completions.create(model=f"{NAME}@production", max_tokens=16, messages=[
            {"role": "system", "content": "존댓말로 답하세요."}, {"role": "user", "content": QUESTIONS[0]}])
        assert chat.choices[0].message.content == _chat(keyed, f"{NAME}@production", QUESTIONS[0], max_tokens=16)


def test_loraops_serve_as_a_judge_is_refused_naming_its_unreadable_replies(server, served_project, tmp_path):
    """Another `loraops serve` is an OpenAI-compatible judge endpoint like any other; the tiny model's replies are not
    the rubric's JSON, so `loraops judge calibrate` counts them, shows one and refuses the judge (exit 3)."""
    import csv
    import json

    from helpers import copy_project, run_cli

    project = copy_project(served_project, tmp_path / "ws")  # the calibration run goes to a copy's MLflow store
    sheet = tmp_path / "ratings.csv"
    with sheet.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["question", "answer", "relevance", "accuracy", "completeness"])
        writer.writeheader()
        for number, question in enumerate(QUESTIONS[:6]):
            writer.writerow({"question": question, "answer": "환기를 자주 하고 제습기를 쓰세요.",
                             "relevance": 1 + number % 5, "accuracy": 2, "completeness": 3})
    out = run_cli(["judge", "calibrate", "--ratings", sheet, "--json", "--set", f"eval.judge.base_url={server}",
                   "--set", f"eval.judge.model={NAME}@production", "--set", "eval.judge.max_tokens=24",
                   "--set", f"eval.judge.cache_dir={tmp_path / 'cache'}"], project)
    assert out.returncode == 3, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["valid"] is False and result["unparsed"]["count"] == 6 and result["unparsed"]["of"] == 6
    assert result["unparsed"]["example"] and result["usage"]["requests"] == 6
    assert all("6 of 6 judge replies could not be parsed" in c["short"][-1] for c in result["criteria"].values())
