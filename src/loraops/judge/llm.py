"""An LLM rubric judge over any OpenAI-compatible endpoint (``eval.judge``).

Each answer is sent once, with its question and reference, in the rubric prompt; the reply is one JSON object
giving every criterion a 1–5 score and a short reason. Replies are cached under the hash of what decides them
(endpoint, model, prompt, temperature, max_tokens), so a rerun asks nothing again. Calls that miss the cache share
a rate limit (``requests_per_minute``) and run ``concurrency`` at a time; the OpenAI client retries I/O failures
(connection, timeout, 429, 5xx, honouring Retry-After) ``retries`` times; a reply that does not parse is counted,
never retried (asking again at temperature 0 gives the same reply). Tokens and requests are counted per judge.

In pairwise mode the judge reads two answers to one question (A and B) and names the better; each pair is asked
in both orders, and a preference that does not survive the swap counts as a tie (position bias, reported).

Nothing here reads or writes project files; the key is read from the environment variable the params name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraops.core.config import JudgeSection
from loraops.core.errors import LoraopsError
from loraops.core.paths import user_cache

SCORES = (1, 2, 3, 4, 5)
PAIRWISE_PROMPT = ("당신은 고객 상담 답변을 비교하는 전문가입니다. 아래 질문에 대한 두 답변 중 기준({criteria})에 비추어 "
                   "더 나은 것을 고르세요.\n질문: {question}\n참고 답변: {reference}\n\n답변 A: {a}\n\n답변 B: {b}\n\n"
                   '다른 말 없이 JSON 하나로만 답하세요. 형식: {{"better": "A" 또는 "B" 또는 "tie", "reason": "한 문장"}}')


class JudgeError(LoraopsError, RuntimeError):
    """The judge endpoint could not be reached, refused the request, or its replies could not be read."""


@dataclass
class Verdict:
    """One answer's scores (1–5) and reasons per criterion; ``scores`` is None when the reply did not parse."""

    scores: dict[str, int] | None
    reasons: dict[str, str]
    reply: str
    cached: bool = False


@dataclass
class Usage:
    """What a judge cost: requests sent (cache misses), replies from the cache, tokens in and out."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unparsed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "cached": self.cached, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "unparsed": self.unparsed}


def reply_format(criteria: list[str]) -> str:
    """The JSON the prompt asks for, with every criterion named."""
    return json.dumps({c: {"score": "1~5", "reason": "한 문장"} for c in criteria}, ensure_ascii=False)


def render(cfg: JudgeSection, question: str, reference: str | None, answer: str) -> str:
    """The rubric prompt for one answer (a demo question has no reference: ``(없음)``)."""
    criteria = "\n".join(f"- {name}: {text}" for name, text in cfg.criteria.items())
    return cfg.prompt.format(criteria=criteria, question=question, reference=reference or "(없음)", answer=answer,
                             format=reply_format(list(cfg.criteria)))


_OBJECT = re.compile(r"\{.*\}", re.S)


def _json_object(reply: str) -> dict[str, Any] | None:
    """The JSON object in a reply (models wrap it in a ```json fence or a sentence)."""
    text = reply.strip()
    match = _OBJECT.search(text)
    if match is None:
        return None
    try:
        found = json.loads(match.group(0))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and float(value).is_integer() and int(value) in SCORES:
        return int(value)
    if isinstance(value, str) and value.strip() in {str(s) for s in SCORES}:
        return int(value.strip())
    return None


def parse(reply: str, criteria: list[str]) -> tuple[dict[str, int], dict[str, str]] | None:
    """Scores and reasons from a reply: ``{"<criterion>": {"score": 1-5, "reason": "…"}, …}`` (or
    ``{"<criterion>": 1-5, …, "reason": "…"}``); None unless every criterion has an integer score 1–5."""
    found = _json_object(reply)
    if found is None:
        return None
    scores, reasons = {}, {}
    for criterion in criteria:
        entry = found.get(criterion)
        if isinstance(entry, dict):
            score, reason = _score(entry.get("score")), str(entry.get("reason") or "")
        else:
            score, reason = _score(entry), str(found.get("reason") or "")
        if score is None:
            return None
        scores[criterion], reasons[criterion] = score, " ".join(reason.split())[:300]
    return scores, reasons


def parse_preference(reply: str) -> str | None:
    """``A``, ``B`` or ``tie`` from a pairwise reply; None when it names none."""
    found = _json_object(reply)
    if found is None:
        return None
    better = str(found.get("better", "")).strip().upper()
    return {"A": "A", "B": "B", "TIE": "tie"}.get(better)


def fingerprint(cfg: JudgeSection) -> str:
    """What decides the judge's scores: endpoint, model, rubric, prompt, temperature, length. A calibration holds for
    this fingerprint only; rate limits, retries and the cache do not change a score."""
    what = {"base_url": (cfg.base_url or "").rstrip("/"), "model": cfg.model, "criteria": cfg.criteria,
            "prompt": cfg.prompt, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    return hashlib.sha256(json.dumps(what, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def describe(cfg: JudgeSection) -> str:
    return f"{cfg.model} at {cfg.base_url} (judge {fingerprint(cfg)})"


def cache_dir(cfg: JudgeSection) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return user_cache("judge")


class Judge:
    """Asks the configured endpoint; replies cached by content hash, calls rate-limited and counted.

    Raises (from its methods):
        JudgeError: the endpoint is unreachable after the retries, or refused the request (401/403 name the key's
            variable, 404 the model).
    """

    def __init__(self, cfg: JudgeSection) -> None:
        if not cfg.base_url or not cfg.model:
            raise JudgeError("eval.judge.base_url and eval.judge.model: both are needed to ask a judge")
        self.cfg = cfg
        self.cache = cache_dir(cfg)
        self.usage = Usage()
        self._client: Any = None
        self._next_slot = 0.0
        self._slot_lock = threading.Lock()

    def _key(self, prompt: str) -> str:
        what = {"base_url": (self.cfg.base_url or "").rstrip("/"), "model": self.cfg.model, "prompt": prompt,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        return hashlib.sha256(json.dumps(what, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def ask(self, prompt: str) -> tuple[str, bool]:
        """The reply to ``prompt`` and whether it came from the cache."""
        path = self.cache / (key := self._key(prompt))[:2] / f"{key}.json"
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
            with self.usage.lock:
                self.usage.cached += 1
            return str(reply), True
        except (OSError, ValueError, KeyError):
            pass
        self._wait_for_slot()
        reply, usage = self._call(prompt)
        with self.usage.lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += usage[0]
            self.usage.completion_tokens += usage[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"model": self.cfg.model, "prompt": prompt, "reply": reply}, ensure_ascii=False),
                       encoding="utf-8")
        tmp.replace(path)
        return reply, False

    def _open(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.cfg.base_url, api_key=os.environ.get(self.cfg.api_key_env) or "none",
                             max_retries=self.cfg.retries, timeout=self.cfg.timeout_seconds)

    def _wait_for_slot(self) -> None:
        """At most ``requests_per_minute`` calls a minute across threads: each takes the next free start time."""
        gap = 60.0 / self.cfg.requests_per_minute
        with self._slot_lock:
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + gap
        if start > now:
            time.sleep(start - now)

    def _call(self, prompt: str) -> tuple[str, tuple[int, int]]:
        import openai

        if self._client is None:
            self._client = self._open()
        where = f"eval.judge.base_url {self.cfg.base_url}"
        try:
            response = self._client.chat.completions.create(
                model=self.cfg.model, messages=[{"role": "user", "content": prompt}],
                temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            raise JudgeError(f"{where}: no answer after {self.cfg.retries} retries ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]}); check that the endpoint is up, or raise eval.judge.retries") from None
        except openai.APIStatusError as exc:
            hint = {401: f"; is {self.cfg.api_key_env} set to a valid key?",
                    403: f"; is {self.cfg.api_key_env} set to a valid key?",
                    404: f"; does the endpoint serve eval.judge.model {self.cfg.model!r}?"}.get(exc.status_code, "")
            raise JudgeError(f"{where} refused the request: HTTP {exc.status_code} {str(exc.message)[:200]}{hint}") from None
        choice = response.choices[0] if response.choices else None
        used = getattr(response, "usage", None)
        tokens = (int(getattr(used, "prompt_tokens", 0) or 0), int(getattr(used, "completion_tokens", 0) or 0))
        return ((choice.message.content or "") if choice is not None else ""), tokens

    def check(self) -> list[str]:
        """Before any training: the endpoint answers and serves ``model`` (when it lists its models); returns them.

        Raises:
            JudgeError: unreachable, refused, or the model is not among those it lists.
        """
        import openai

        if self._client is None:
            self._client = self._open()
        where = f"eval.judge.base_url {self.cfg.base_url}"
        try:
            served = [m.id for m in self._client.models.list()]
        except openai.APIConnectionError as exc:
            raise JudgeError(f"{where}: the judge endpoint does not answer ({exc.__class__.__name__}); start it or fix "
                             "the URL before training") from None
        except openai.APIStatusError as exc:
            if exc.status_code == 404:  # an endpoint without a model list: the first scoring call will tell
                return []
            hint = f"; is {self.cfg.api_key_env} set to a valid key?" if exc.status_code in (401, 403) else ""
            raise JudgeError(f"{where} refused: HTTP {exc.status_code} {str(exc.message)[:200]}{hint}") from None
        if served and self.cfg.model not in served:
            raise JudgeError(f"eval.judge.model: {self.cfg.model!r} is not served at {self.cfg.base_url} (it serves "
                             f"{', '.join(served[:10])})")
        return served

    def _map(self, function: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1 or self.cfg.concurrency == 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(function, items))

    def score(self, items: list[tuple[str, str | None, str]]) -> list[Verdict]:
        """One verdict per (question, reference, answer), in order."""
        criteria = list(self.cfg.criteria)

        def one(item: tuple[str, str | None, str]) -> Verdict:
            reply, cached = self.ask(render(self.cfg, *item))
            parsed = parse(reply, criteria)
            if parsed is None:
                with self.usage.lock:
                    self.usage.unparsed += 1
                return Verdict(None, {}, reply, cached)
            return Verdict(parsed[0], parsed[1], reply, cached)

        return self._map(one, items)

    def prefer(self, items: list[tuple[str, str | None, str, str]]) -> list[dict[str, Any]]:
        """Pairwise: for each (question, reference, first, second), the judge's pick in both orders and the verdict
        for ``second`` over ``first`` (1 win, 0.5 tie or inconsistent, 0 loss; None when a reply did not parse)."""
        criteria = ", ".join(self.cfg.criteria)

        def one(item: tuple[str, str | None, str, str]) -> dict[str, Any]:
            question, reference, first, second = item
            asked = [PAIRWISE_PROMPT.format(criteria=criteria, question=question, reference=reference or "(없음)",
                                            a=a, b=b) for a, b in ((first, second), (second, first))]
            picks = [parse_preference(self.ask(prompt)[0]) for prompt in asked]
            if None in picks:
                with self.usage.lock:
                    self.usage.unparsed += 1
                return {"score": None, "picks": picks, "consistent": None}
            second_wins = [picks[0] == "B", picks[1] == "A"]
            first_wins = [picks[0] == "A", picks[1] == "B"]
            if all(second_wins):
                score = 1.0
            elif all(first_wins):
                score = 0.0
            else:
                score = 0.5
            # a pick that flips with the order: the judge preferred a position, not an answer
            consistent = not ((any(second_wins) and not all(second_wins)) or (any(first_wins) and not all(first_wins)))
            return {"score": score, "picks": picks, "consistent": consistent}

        return self._map(one, items)


def require_parsed(verdicts: list[Verdict], cfg: JudgeSection, what: str) -> None:
    """Stop when more replies failed to parse than ``eval.judge.max_unparsed`` allows, naming how many and showing one.

    Raises:
        JudgeError: too many unparsed replies.
    """
    failed = [v for v in verdicts if v.scores is None]
    if not verdicts or len(failed) / len(verdicts) <= cfg.max_unparsed:
        return
    example = " ".join(failed[0].reply.split())[:300] or "(an empty reply)"
    raise JudgeError(f"eval.judge: {len(failed)} of {len(verdicts)} judge replies on {what} could not be parsed "
                     f"(more than eval.judge.max_unparsed {cfg.max_unparsed:.0%}); {describe(cfg)} must answer with "
                     f"one JSON object scoring {', '.join(cfg.criteria)} 1–5. One reply: {example!r}")
