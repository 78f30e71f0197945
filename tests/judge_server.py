"""A small judge that speaks the OpenAI chat-completions API on loopback, for the judge tests.

Its scoring rule is known and stated, because the tests check plumbing and statistics, not wisdom:

- the answer to score is the text after ``채점할 답변:`` in the prompt, the reference the text after ``참고 답변:``;
- ``rule_score(answer, reference)`` = 1 + round(4 × the share of the reference's distinct Hangul syllables that the
  answer contains); without a reference (``(없음)``): 1 + the answer's length in characters // 15, at most 5;
- every criterion gets that score; ``mode`` "reverse" gives 6 − score (a judge that disagrees), "garbage" replies
  in prose that does not parse;
- a pairwise prompt (``답변 A:`` / ``답변 B:``) prefers the answer with the higher rule score, always "A" in mode
  "first" (a judge biased to the first position);
- ``fail_next`` holds HTTP statuses to answer first (429 with ``Retry-After: 0``, 500), one per request.

Every request's body is kept in ``requests``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANGUL = re.compile(r"[가-힣]")


def rule_score(answer: str, reference: str | None) -> int:
    if not reference or reference.strip() == "(없음)":
        return min(5, 1 + len(answer.strip()) // 15)
    wanted = set(HANGUL.findall(reference))
    if not wanted:
        return 1
    return 1 + round(4 * len(wanted & set(HANGUL.findall(answer))) / len(wanted))


def _after(prompt: str, label: str, stops: tuple[str, ...]) -> str:
    start = prompt.index(label) + len(label)
    ends = [prompt.find(stop, start) for stop in stops]
    end = min([e for e in ends if e >= 0] or [len(prompt)])
    return prompt[start:end].strip()


class JudgeServer:
    """``with JudgeServer() as judge:`` serves at ``judge.url`` (``http://127.0.0.1:PORT/v1``) until the block ends."""

    def __init__(self, mode: str = "agree", model: str = "rule-judge") -> None:
        self.mode, self.model = mode, model
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "JudgeServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, prompt: str) -> str:
        if self.mode == "garbage":
            return "이 답변은 대체로 괜찮아 보입니다. 점수는 높은 편입니다."
        if "답변 A:" in prompt:
            question_ref = _after(prompt, "참고 답변:", ("\n",))
            a = _after(prompt, "답변 A:", ("\n\n답변 B:",))
            b = _after(prompt, "답변 B:", ("\n\n",))
            if self.mode == "first":
                better = "A"
            else:
                sa, sb = rule_score(a, question_ref), rule_score(b, question_ref)
                better = "A" if sa > sb else "B" if sb > sa else "tie"
            return json.dumps({"better": better, "reason": "규칙에 따른 비교"}, ensure_ascii=False)
        criteria = re.findall(r"^- ([a-z_]+):", prompt, re.M)
        score = rule_score(_after(prompt, "채점할 답변:", ("\n\n",)), _after(prompt, "참고 답변:", ("\n",)))
        if self.mode == "reverse":
            score = 6 - score
        body = {c: {"score": score, "reason": f"참고 답변의 음절과 겹치는 정도로 {score}점"} for c in criteria}
        return "```json\n" + json.dumps(body, ensure_ascii=False) + "\n```"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer.lock:
                    outer.requests.append(body)
                    status = outer.fail_next.pop(0) if outer.fail_next else 200
                if status != 200:
                    self._send(status, {"error": {"message": f"test failure {status}", "type": "server_error"}},
                               {"Retry-After": "0"} if status == 429 else None)
                    return
                if body.get("model") != outer.model:
                    self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
                    return
                prompt = body["messages"][-1]["content"]
                content = outer.reply(prompt)
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": outer.model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(content),
                                           "total_tokens": len(prompt) + len(content)}})

        return Handler
