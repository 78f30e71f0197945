"""Stage `augment`: more training rows from the prepared train split, the domain documents and a teacher model.

Three sources, each row marked with ``source``:

- ``rule``: Korean question variants that need no model. ``ending`` re-conjugates the question's final ending into
  another politeness with kiwipiepy (``있나요?`` → ``있습니까?`` / ``있어요?``); ``spacing`` runs some words together
  the way customers type; ``join`` asks two questions of one category at once (``…? 또한, …?``), both answers in one.
- ``teacher``: more answers to a training question from a teacher model, through any OpenAI-compatible endpoint
  (the ``openai`` client; its retries cover connection errors, timeouts, 429 and 5xx only) or a local transformers
  model. Replies are cached by content hash, so a rerun never calls the teacher again.
- ``document``: question-answer pairs the teacher writes from the retrieval corpus's chunks.

Every added row is train-only and keeps its origin's ``group``. Filters drop exact and near duplicates, answers
outside the length bounds, degenerate answers, and any row whose question is close to a validation or test
question (the leakage guard). Output: ``data/augmented/train.jsonl`` (the original rows, ``source: original``,
then the added ones) and ``data/augmented/card.json``. With ``augment.enabled`` off the file is the prepared train
split byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from loraops.core.config import AugmentSection, Params, TeacherSection
from loraops.core.errors import DataError, LoraopsError
from loraops.core.paths import AUGMENT_CARD, AUGMENTED_DIR, split, user_cache
from loraops.core.utils import atomic_dir, jsonl_line, say

SOURCES = ("original", "rule", "teacher", "document")


class TeacherError(LoraopsError, RuntimeError):
    """The teacher endpoint could not be reached or refused the request."""


# ---------------------------------------------------------------- similarity


def _surface(text: str) -> str:
    """The text as written, with runs of whitespace as one space: an exact duplicate is equal here."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _letters(text: str) -> str:
    """Letters and digits only, NFC and lower case: what two phrasings of one question share."""
    text = unicodedata.normalize("NFC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def bigrams(text: str, keep_spaces: bool = False) -> frozenset[str]:
    """Character bigrams; without spaces and punctuation unless ``keep_spaces`` (surface form)."""
    chars = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text).strip()) if keep_spaces else _letters(text)
    return frozenset(chars[i: i + 2] for i in range(len(chars) - 1)) or frozenset([chars])


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_CONTENT_POS = ("NNG", "NNP", "NR", "NP", "VV", "VA", "MAG", "XR", "SL", "SN", "SH")


class LeakageGuard:
    """How close a question is to the nearest validation or test question: the IDF-weighted Jaccard of their
    content morphemes (kiwipiepy, spaces removed first), so an ending or spacing variant of a held-out question
    scores 1 while a question that only shares the template (``… 문제를 예방하려면 어떻게 해야 하나요?``) with
    another topic scores low; the weights come from every question the guard has seen."""

    def __init__(self, held_out: list[str], others: Sequence[str] = ()) -> None:
        import math

        from loraops.core.korean import analyser

        self._kiwi, self._terms = analyser(), dict[str, frozenset[str]]()
        self.questions = sorted(set(held_out))
        sets = [self.terms(q) for q in self.questions]
        every = [self.terms(q) for q in sorted(set(others) - set(self.questions))] + sets
        df = Counter(term for terms in every for term in terms)
        self._weight = lambda term: math.log((len(every) + 1) / (df.get(term, 0) + 1)) + 0.01
        self.sets, self.postings = sets, defaultdict(list)
        for i, terms in enumerate(sets):
            for term in terms:
                self.postings[term].append(i)

    def terms(self, text: str) -> frozenset[str]:
        if text not in self._terms:
            tokens = self._kiwi.tokenize(re.sub(r"\s+", "", unicodedata.normalize("NFC", text)))
            self._terms[text] = frozenset(t.form for t in tokens if t.tag.startswith(_CONTENT_POS))
        return self._terms[text]

    def nearest(self, text: str) -> tuple[float, str | None]:
        """``(similarity, held-out question)`` of the closest held-out question; ``(0.0, None)`` if none shares a term."""
        mine = self.terms(text)
        best: tuple[float, str | None] = (0.0, None)
        for i in sorted({i for term in mine for i in self.postings.get(term, ())}):
            union = sum(self._weight(t) for t in mine | self.sets[i])
            score = sum(self._weight(t) for t in mine & self.sets[i]) / union if union else 1.0
            if score > best[0]:
                best = (score, self.questions[i])
        return best


# ---------------------------------------------------------------- rule variants

_ENDINGS = ("습니까", "나요", "어요")
"""Question endings offered by the ``ending`` rule: formal, polite, polite-casual."""
_JAMO = re.compile(r"[\u1100-\u11ff\u3130-\u318f]")
_PREDICATE = ("VV", "VA", "VX", "XSV", "XSA", "VCP", "EP")


class Rules:
    """The rule-based question variants; kiwipiepy re-conjugates the endings."""

    def __init__(self) -> None:
        from loraops.core.korean import analyser

        self.kiwi = analyser()

    def endings(self, question: str) -> list[str]:
        """The question with its final ending in each other politeness; none when it is not a question ending in a
        predicate kiwipiepy can conjugate (a request, a noun phrase), or when the result is not clean Hangul."""
        text = question.rstrip()
        if not text.endswith("?"):
            return []
        tokens = self.kiwi.tokenize(text)
        finals = [i for i, t in enumerate(tokens) if t.tag == "EF"]
        if not finals or finals[-1] == 0:
            return []
        last = finals[-1]
        if any(t.tag not in ("SF", "JX", "SE") for t in tokens[last + 1:]) or tokens[last - 1].tag not in _PREDICATE:
            return []
        word_start = text.rfind(" ", 0, tokens[last].start) + 1
        word = [(t.form, t.tag) for t in tokens[:last] if t.start >= word_start]
        if not word:
            return []
        copula = any(tag == "VCP" for _, tag in word)
        out = []
        for ending in _ENDINGS:
            if copula and ending != "습니까":  # 무엇이나요 / 무엇이어요 are not Korean; 무엇입니까 is
                continue
            try:
                joined = self.kiwi.join([*word, (ending, "EF")]).replace(" ", "")
            except Exception:  # noqa: BLE001 - kiwipiepy cannot conjugate this pair: no variant
                continue
            variant = text[:word_start] + joined + "?"
            if variant != text and not _JAMO.search(variant):
                out.append(variant)
        return out

    @staticmethod
    def spacing(question: str, rng: random.Random) -> list[str]:
        """The question with about half of its word gaps closed (at least one), as customers often type."""
        words = question.split(" ")
        if len(words) < 3:
            return []
        gaps = rng.sample(range(len(words) - 1), max(1, (len(words) - 1) // 2))
        text = words[0]
        for i, word in enumerate(words[1:]):
            text += ("" if i in gaps else " ") + word
        return [text]


def join_questions(first: str, second: str) -> str:
    """Two questions asked in one message: ``…? 또한, …?``."""
    first = first.rstrip()
    if not first.endswith(("?", ".", "!")):
        first += "?"
    return f"{first} 또한, {second.strip()}"


# ---------------------------------------------------------------- teacher


_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,2}\s*[.):\]]|[-*•·]|(?:답변|answer)\s*\d*\s*[:：])\s*", re.IGNORECASE)
_PAIR = re.compile(r"(?:질문|Q)\s*\d*\s*[:：]\s*(?P<q>.+?)\s*\n+\s*(?:\d{1,2}[.)]\s*)?(?:답변|A)\s*\d*\s*[:：]\s*"
                   r"(?P<a>.+?)\s*(?=\n\s*(?:\d{1,2}[.)]\s*)?(?:질문|Q)\s*\d*\s*[:：]|\Z)", re.S)


def parse_answers(reply: str) -> list[str] | None:
    """The answers in a teacher reply: a JSON list of strings, or one per line (numbering and bullets removed).

    Returns None when nothing in it is an answer (empty, only punctuation, JSON of another shape): unparseable.
    """
    text = reply.strip()
    if text.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if data is not None:
            if isinstance(data, list) and all(isinstance(x, str) for x in data):
                found = [x.strip() for x in data if _letters(x)]
                return found or None
            return None
    lines = [_NUMBERING.sub("", line).strip() for line in text.splitlines()]
    found = [line for line in lines if _letters(line)]
    return found or None


def parse_pairs(reply: str) -> list[tuple[str, str]] | None:
    """The question-answer pairs in a teacher reply (``질문: …`` / ``답변: …`` lines, or a JSON list of objects with
    question and answer); None when there are none."""
    text = reply.strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, list):
            pairs = [(str(d.get("question", "")).strip(), str(d.get("answer", "")).strip())
                     for d in data if isinstance(d, dict)]
            pairs = [(q, a) for q, a in pairs if _letters(q) and _letters(a)]
            return pairs or None
    pairs = [(m["q"].strip(), " ".join(m["a"].split())) for m in _PAIR.finditer(text)]
    pairs = [(q, a) for q, a in pairs if _letters(q) and _letters(a)]
    return pairs or None


def cache_dir(cfg: TeacherSection) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return user_cache("teacher")


class Teacher:
    """Asks the teacher model; each reply is cached under the hash of what decides it (backend, model, prompt,
    temperature, max_tokens, seed), so a rerun never calls it again."""

    def __init__(self, cfg: TeacherSection, seed: int, device: str = "cpu") -> None:
        self.cfg, self.seed, self.device = cfg, seed, device
        self.cache = cache_dir(cfg)
        self.calls = self.cached = 0
        self._client: Any = None
        self._local: Any = None
        self._last_call = 0.0

    def key(self, prompt: str) -> str:
        what = {"backend": self.cfg.backend, "model": self.cfg.model, "prompt": prompt,
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens, "seed": self.seed}
        return hashlib.sha256(json.dumps(what, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def ask(self, prompt: str) -> str:
        """The reply to ``prompt``, from the cache when it was asked before.

        Raises:
            TeacherError: the endpoint is unreachable after ``retries`` retries, or refused the request.
        """
        path = self.cache / (key := self.key(prompt))[:2] / f"{key}.json"
        if path.exists():
            self.cached += 1
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        wait = 60.0 / self.cfg.requests_per_minute - (time.monotonic() - self._last_call)
        if wait > 0:
            time.sleep(wait)
        self._last_call = time.monotonic()
        reply = self._local_reply(prompt) if self.cfg.backend == "local" else self._endpoint_reply(prompt)
        self.calls += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": self.cfg.model, "prompt": prompt, "reply": reply}, ensure_ascii=False),
                       encoding="utf-8")
        tmp.replace(path)
        return reply

    def _endpoint_reply(self, prompt: str) -> str:
        import openai

        if self._client is None:
            self._client = openai.OpenAI(base_url=self.cfg.base_url, api_key=os.environ.get(self.cfg.api_key_env) or "none",
                                         max_retries=self.cfg.retries, timeout=self.cfg.timeout_seconds)
        where = f"augment.teacher.base_url {self.cfg.base_url}"
        try:
            response = self._client.chat.completions.create(
                model=self.cfg.model, messages=[{"role": "user", "content": prompt}], temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens, seed=self.seed)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            raise TeacherError(f"{where}: no answer after {self.cfg.retries} retries ({exc.__class__.__name__}: "
                               f"{str(exc)[:200]}); check that the endpoint is up, or raise augment.teacher.retries") from None
        except openai.APIStatusError as exc:
            hint = f"; is {self.cfg.api_key_env} set to a valid key?" if exc.status_code in (401, 403) else ""
            raise TeacherError(f"{where} refused the request: HTTP {exc.status_code} {str(exc.message)[:200]}{hint}") from None
        choice = response.choices[0] if response.choices else None
        return (choice.message.content or "") if choice is not None else ""

    def _local_reply(self, prompt: str) -> str:
        import torch

        from loraops.core.config import ModelSection
        from loraops.modeling.model import load_base, load_tokenizer

        if self._local is None:
            if not self.cfg.model:
                raise TeacherError("augment.teacher.model: a local teacher needs a hub id or a local directory")
            cfg = ModelSection(base=self.cfg.model)
            self._local = (load_base(self.cfg.model, cfg, self.device), load_tokenizer(self.cfg.model, cfg))
        model, tokenizer = self._local
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = (tokenizer.bos_token or "") + prompt
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        torch.manual_seed(self.seed)
        sample = self.cfg.temperature > 0
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=self.cfg.max_tokens, do_sample=sample,
                                 temperature=self.cfg.temperature if sample else None,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- the stage's logic


def _row(origin: dict[str, Any], question: str, answer: str, source: str, how: str, **extra: Any) -> dict[str, Any]:
    return {"group": origin["group"], "question": question, "answer": answer, "category": origin["category"],
            "source": source, "origin": how, "attributes": dict(origin.get("attributes") or {}), **extra}


def rule_rows(train: list[dict[str, Any]], cfg: AugmentSection, rng: random.Random) -> list[dict[str, Any]]:
    """Variants of each distinct training question (at most ``variants_per_question``), and joined questions."""
    rules = Rules() if "ending" in cfg.rules else None
    answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in train:
        answers[row["group"]].append(row)
    out = []
    for (question, group), _ in sorted({(r["question"], r["group"]): r for r in train}.items()):
        found = [("ending", v) for v in (rules.endings(question) if rules else [])]
        if "spacing" in cfg.rules:
            found += [("spacing", v) for v in Rules.spacing(question, rng)]
        rng.shuffle(found)
        for rule, variant in found[: cfg.variants_per_question]:
            origin = rng.choice(answers[group])
            out.append(_row(origin, variant, origin["answer"], "rule", f"rule:{rule} of {origin['id']}"))
    if "join" in cfg.rules:
        by_category: dict[str, list[str]] = defaultdict(list)
        for group in sorted(answers):
            by_category[answers[group][0]["category"]].append(group)
        pool = [g for groups in by_category.values() if len(groups) > 1 for g in groups]
        for group in sorted(rng.sample(pool, min(len(pool), round(cfg.join_share * len(answers))))):
            mates = [g for g in by_category[answers[group][0]["category"]] if g != group]
            a, b = rng.choice(answers[group]), rng.choice(answers[rng.choice(mates)])
            out.append(_row(a, join_questions(a["question"], b["question"]), f"{a['answer']} {b['answer']}", "rule",
                            f"rule:join of {a['id']} and {b['id']}", origin_groups=[a["group"], b["group"]]))
    return out


def teacher_rows(train: list[dict[str, Any]], teacher: Teacher, cfg: AugmentSection, rng: random.Random,
                 counts: Counter) -> list[dict[str, Any]]:
    """More answers to one question of each training group (at most ``teacher.max_questions`` groups)."""
    t = cfg.teacher
    firsts = {r["group"]: r for r in reversed(train)}
    groups = sorted(firsts)
    if t.max_questions is not None and len(groups) > t.max_questions:
        groups = sorted(rng.sample(groups, t.max_questions))
    out = []
    for number, group in enumerate(groups, start=1):
        origin = firsts[group]
        reply = teacher.ask(t.prompt.format(question=origin["question"], answer=origin["answer"],
                                            n=t.answers_per_question, max_chars=t.max_chars))
        answers = parse_answers(reply)
        if answers is None:
            counts["teacher_unparseable"] += 1
            continue
        for answer in answers[: t.answers_per_question]:
            out.append(_row(origin, origin["question"], answer, "teacher", f"teacher:{t.model} on {origin['id']}"))
        if number % 25 == 0:
            say(f"teacher: {number}/{len(groups)} questions ({teacher.calls} calls, {teacher.cached} from the cache)")
    return out


def document_rows(params: Params, teacher: Teacher, rng: random.Random, counts: Counter,
                  root: Path = Path(".")) -> list[dict[str, Any]]:
    """Question-answer pairs the teacher writes from each chunk of the domain documents (rag.docs_path)."""
    from loraops.retrieval.index import chunk, read_documents

    t, rag = params.augment.teacher, params.rag
    docs = read_documents(rag.model_copy(update={"corpus": "docs"}), root)
    chunks = [c for doc_id, text in docs for c in chunk(doc_id, text, rag.chunk_chars, rag.chunk_overlap)]
    if t.max_questions is not None and len(chunks) > t.max_questions:
        chunks = sorted(rng.sample(chunks, t.max_questions), key=lambda c: c.id)
    out = []
    for piece in chunks:
        pairs = parse_pairs(teacher.ask(t.document_prompt.format(passage=piece.text, n=t.answers_per_question,
                                                                 max_chars=t.max_chars)))
        if pairs is None:
            counts["document_unparseable"] += 1
            continue
        origin = {"group": f"doc:{piece.doc_id}", "category": "(documents)", "attributes": {}}
        out += [_row(origin, q, a, "document", f"document:{piece.id}") for q, a in pairs[: t.answers_per_question]]
    return out


def filtered(added: list[dict[str, Any]], train: list[dict[str, Any]], held_out: list[dict[str, Any]],
             cfg: AugmentSection, counts: Counter) -> list[dict[str, Any]]:
    """The added rows that pass every filter, in order; what each filter removed is counted in ``counts``."""
    from loraops.judge import degenerate

    closed = {r["group"] for r in held_out}
    leak = LeakageGuard([r["question"] for r in held_out], [r["question"] for r in train + added])
    seen = {(_surface(r["question"]), _surface(r["answer"])) for r in train}
    kept_by_group: dict[str, list[tuple[frozenset, frozenset]]] = defaultdict(list)
    for r in train:
        kept_by_group[r["group"]].append((bigrams(r["question"], True), bigrams(r["answer"], True)))
    out = []
    for row in added:
        key = (_surface(row["question"]), _surface(row["answer"]))
        reason = None
        if closed & {row["group"], *row.get("origin_groups", [])}:
            reason = "shares_group_with_held_out"
        elif key in seen:
            reason = "exact_duplicate"
        elif len(row["answer"]) < cfg.min_answer_chars:
            reason = "answer_too_short"
        elif len(row["answer"]) > cfg.max_answer_chars:
            reason = "answer_too_long"
        elif degenerate.detect(row["answer"]) is not None:
            reason = "degenerate_answer"
        elif leak.questions and leak.nearest(row["question"])[0] >= cfg.leakage_threshold:
            reason = "close_to_validation_or_test"
        else:
            q, a = bigrams(row["question"], True), bigrams(row["answer"], True)
            if any(jaccard(q, kq) >= cfg.near_duplicate and jaccard(a, ka) >= cfg.near_duplicate
                   for kq, ka in kept_by_group[row["group"]]):
                reason = "near_duplicate"
        if reason is not None:
            counts[reason] += 1
            continue
        seen.add(key)
        kept_by_group[row["group"]].append((bigrams(row["question"], True), bigrams(row["answer"], True)))
        out.append(row)
    return out


def augment(params: Params, train: list[dict[str, Any]], held_out: list[dict[str, Any]],
            teacher: Teacher | None = None, root: Path = Path(".")) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pure stage logic (the teacher aside): the original rows then the added ones that pass the filters, and the
    card (counts per source and rule, what each filter removed, teacher calls)."""
    from loraops.core.text import fill

    cfg = params.augment
    rng = random.Random(params.base.seed)
    counts: Counter = Counter()
    added = rule_rows(train, cfg, rng)
    if teacher is not None:
        added += teacher_rows(train, teacher, cfg, rng, counts)
        if cfg.documents:
            added += document_rows(params, teacher, rng, counts, root)
    proposed = Counter(r["source"] for r in added)
    kept = filtered(added, train, held_out, cfg, counts)
    originals = [{**r, "source": "original", "origin": r.get("source", "")} for r in train]
    rows = originals + [{"id": f"augmented-{i:05d}", **r,
                         "prompt": fill(params.data.template, {"question": r["question"], "category": r["category"],
                                                               **r["attributes"]}, "data.template")}
                        for i, r in enumerate(kept)]
    by_rule = Counter(r["origin"].split(" ")[0].removeprefix("rule:") for r in kept if r["source"] == "rule")
    card = {
        "enabled": True,
        "rows": len(rows),
        "by_source": {s: sum(r["source"] == s for r in rows) for s in SOURCES},
        "by_rule": dict(sorted(by_rule.items())),
        "proposed": {s: proposed.get(s, 0) for s in SOURCES[1:]},
        "removed": {k: counts[k] for k in sorted(counts) if not k.endswith("_unparseable")},
        "unparseable_replies": {k.removesuffix("_unparseable"): counts[k] for k in sorted(counts) if k.endswith("_unparseable")},
        "groups_added": len({r["group"] for r in kept} - {r["group"] for r in train}),
    }
    if teacher is not None:
        card["teacher"] = {"backend": cfg.teacher.backend, "model": cfg.teacher.model, "calls": teacher.calls,
                           "cached": teacher.cached}
    return rows, card


def run(params: Params, root: Path = Path("."), say_progress: Callable[[str], Any] = say) -> dict[str, Any]:
    """The DVC stage: write ``data/augmented`` (a byte copy of the prepared train split when off); return the card."""
    from loraops.core.readers import load_split
    from loraops.core.utils import pick_device

    target = root / AUGMENTED_DIR
    if not params.augment.enabled:
        train = load_split("train", root)
        with atomic_dir(target) as tmp:
            shutil.copyfile(root / split("train"), tmp / split("train").name)
            card = {"enabled": False, "rows": len(train), "by_source": {"original": len(train)}}
            (tmp / AUGMENT_CARD.name).write_text(json.dumps(card, ensure_ascii=False, indent=2), encoding="utf-8")
        return card
    train = load_split("train", root)
    held_out = load_split("validation", root) + load_split("test", root)
    if not train:
        raise DataError(f"{root / split('train')}: no training rows to augment")
    teacher = Teacher(params.augment.teacher, params.base.seed, pick_device(params.base.device)) \
        if params.augment.teacher.enabled else None
    rows, card = augment(params, train, held_out, teacher, root)
    with atomic_dir(target) as tmp:
        with (tmp / split("train").name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(jsonl_line(row))
        (tmp / AUGMENT_CARD.name).write_text(json.dumps(card, ensure_ascii=False, indent=2), encoding="utf-8")
    return card
