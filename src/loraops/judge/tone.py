"""Tone: the Korean speech level of a generated line, read from its sentence-final endings (kiwipiepy's tags).

Each sentence is classified by the ending it closes on:

- ``formal`` (하십시오체): -습니다/-ㅂ니다, -습니까, -십시오/-ㅂ시오, -ㅂ시다;
- ``polite`` (해요체): an ending in -요 (-어요, -세요, -나요, -네요 …) or -죠, or the particle 요 after a connective;
- ``casual`` (해체/해라체, plain or intimate): any other sentence-final ending (-어, -자, -지, -야, -ㄴ다 …), or a
  connective ending that intimate speech closes sentences with ("시작해 봐", "좋은데"); one that leaves the sentence
  unfinished ("휴식을 찾는다면") gives no level.

A sentence that closes on a noun, a number or a symbol ("봄맞이 특가 30%") has no level. A line's level is the most
frequent level of its sentences (ties: the last sentence's); a line with none is ``none`` and never matches.

``eval.tone`` maps each value of an attribute column (e.g. ``target_age``) to the level a line for it must use;
evaluation reports tone accuracy overall and per value. ``probe()`` measures the classifier on graded lines
written for this project (``probes/ko_tone.jsonl``), as the other metrics are measured before they are trusted.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from loraops.core.config import Params, ToneSection
from loraops.core.errors import ConfigError, DataError

LEVELS = ("formal", "polite", "casual")
_FORMAL = ("니다", "니까", "시오", "시다")
_SYMBOLS = ("SF", "SP", "SS", "SE", "SO", "SW", "SB", "W_EMOJI")
_CASUAL_CONNECTIVES = ("어", "아", "여", "지", "게", "는데", "ᆫ데", "은데", "거든", "잖아")
"""Connective endings that close a sentence in intimate speech ("시작해 봐", "좋은데"); others ("-면", "-고", "-서")
leave it unfinished ("휴식을 찾는다면"), which has no level."""
PROBE = "ko_tone.jsonl"


class SpeechLevel:
    """Classify lines as formal, polite, casual or none (see the module's rules)."""

    def __init__(self, analyzer: str = "kiwi-cong") -> None:
        from loraops.core.korean import analyser

        self._kiwi = analyser(analyzer)

    def sentences(self, text: str) -> list[str]:
        """The level of each sentence of ``text`` that has one, in order."""
        levels: list[str | None] = []
        current: list[Any] = []
        for token in self._kiwi.tokenize(text):
            if token.tag == "SF":
                levels.append(_sentence_level(current))
                current = []
            else:
                current.append(token)
        levels.append(_sentence_level(current))
        return [level for level in levels if level is not None]

    def __call__(self, text: str) -> str:
        levels = self.sentences(text)
        if not levels:
            return "none"
        counts = Counter(levels)
        best = max(counts.values())
        return next(level for level in reversed(levels) if counts[level] == best)


def _sentence_level(tokens: list[Any]) -> str | None:
    words = [t for t in tokens if not t.tag.startswith(_SYMBOLS)]
    if not words:
        return None
    last = words[-1]
    if last.tag == "JX" and last.form == "요":
        return "polite"
    if last.tag == "EF":
        if last.form.endswith(_FORMAL):
            return "formal"
        return "polite" if last.form.endswith(("요", "죠")) else "casual"
    if last.tag == "EC":
        return "casual" if last.form in _CASUAL_CONNECTIVES else None
    return None


def expected_levels(rows: list[dict[str, Any]], cfg: ToneSection, where: str) -> list[str]:
    """The level each row's line must use, from its ``cfg.column`` value.

    Raises:
        DataError: a row without a value, or with a value ``eval.tone.levels`` does not map (naming row and value).
    """
    out: list[str] = []
    for row in rows:
        value = str(row.get("attributes", {}).get(cfg.column, "")).strip()
        if value not in cfg.levels:
            known = ", ".join(cfg.levels)
            what = f"{cfg.column} {value!r} is not in eval.tone.levels ({known})" if value else f"no {cfg.column}"
            raise DataError(f"{where}: {row.get('source') or row.get('id')}: {what}")
        out.append(cfg.levels[value])
    return out


def check_data(params: Params, root: Path = Path(".")) -> int:
    """Before any training: every row of ``data.path`` has a value ``eval.tone.levels`` maps; return the row count.

    Raises:
        DataError: the first row without one (file, line and value).
    """
    from loraops.core.readers import read_records

    if params.eval.tone is None:
        raise ConfigError("eval.tone is not set: there is no expected speech level to check the data against")
    path = root / params.data.path if not Path(params.data.path).is_absolute() else Path(params.data.path)
    records, _ = read_records(path, params.data)
    expected_levels([{"attributes": r.attributes, "source": r.source} for r in records], params.eval.tone, str(path))
    return len(records)


def scores(classifier: SpeechLevel, answers: list[str], expected: list[str]) -> tuple[list[float], list[str]]:
    """1.0 where an answer's level is the expected one, else 0.0; and the levels read."""
    levels = [classifier(answer) for answer in answers]
    return [float(level == want) for level, want in zip(levels, expected)], levels


def probe(classifier: SpeechLevel) -> dict[str, Any]:
    """Accuracy of the classifier on the graded probe lines, overall and per level, and the lines it got wrong."""
    items = [json.loads(line) for line in resources.files("loraops.judge.probes").joinpath(PROBE).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    read = [classifier(item["text"]) for item in items]
    wrong = [{"text": item["text"], "level": item["level"], "read": got} for item, got in zip(items, read)
             if got != item["level"]]
    per_level = {level: round(1 - sum(w["level"] == level for w in wrong) / max(1, sum(i["level"] == level for i in items)), 4)
                 for level in LEVELS}
    return {"n": len(items), "accuracy": round(1 - len(wrong) / len(items), 4), "per_level": per_level, "wrong": wrong}
