"""Degenerate answers: found before any metric sees them, so garbage cannot score like text.

An untrained or broken model emits text that similarity metrics reward: broken syllables, U+FFFD from
bytes a byte-level tokenizer decoded out of order, phrases looping to the token limit, another script.
Each detector here is a pure function of the answer (and its reference) returning a reason or ``None``;
`detect` runs them in order and returns the first reason. Flagged answers score 0 on every metric and
are counted per model. `clean` is what a user sees: the answer without undecodable characters.
"""

from __future__ import annotations

import re
import unicodedata

REPLACEMENT = "\ufffd"
_LOOP = re.compile(r"(.{2,40}?)(?:\s*\1){3,}", re.DOTALL)  # a 2–40 char unit, then ≥3 more copies
_CHAR_RUN = re.compile(r"(\w)\1{5,}")  # one letter ≥ 6 times in a row ("닥닥닥닥닥닥")


def _is_syllable(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3"


def _content(text: str) -> list[str]:
    """Letters and digits: what carries meaning, with spaces, punctuation and U+FFFD left out."""
    return [ch for ch in text if unicodedata.category(ch)[0] in "LN"]


def hangul_share(text: str) -> float:
    """Share of the letters that are Hangul syllables (jamo and other scripts count against it)."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    return sum(map(_is_syllable, letters)) / len(letters) if letters else 0.0


def empty(answer: str) -> str | None:
    """No letter or digit at all (blank, punctuation only, or only undecodable bytes)."""
    return "empty" if not _content(answer) else None


def undecodable(answer: str) -> str | None:
    """U+FFFD, control characters or lone surrogates inside the answer.

    One trailing U+FFFD is the generation limit cutting a multi-byte character, not a broken model,
    so it is cleaned away without flagging.
    """
    body = answer.rstrip().rstrip(REPLACEMENT)
    bad = sum(ch == REPLACEMENT or "\ud800" <= ch <= "\udfff" or (unicodedata.category(ch) == "Cc" and ch not in "\n\t\r")
              for ch in body)
    return f"undecodable: {bad} invalid character(s)" if bad else None


def broken_syllables(answer: str, min_share: float = 0.1) -> str | None:
    """Hangul syllables outside the 2,350 of KS X 1001 (e.g. 넀, 톛): rare in real text, common in noise."""
    syllables = [ch for ch in answer if _is_syllable(ch)]
    rare = sum(1 for ch in syllables if not _in_ksx1001(ch))
    if rare >= 2 and rare >= min_share * len(syllables):
        return f"broken syllables: {rare} of {len(syllables)} syllables are outside KS X 1001"
    return None


def _in_ksx1001(ch: str) -> bool:
    try:  # Python's codec spells the other syllables as 8-byte jamo sequences: only 2 bytes means KS X 1001
        return len(ch.encode("euc-kr")) == 2
    except UnicodeEncodeError:
        return False


def repetition(answer: str, min_distinct: float = 0.35, n: int = 5) -> str | None:
    """A loop: one unit repeated four times running, one letter six times, or few distinct character n-grams.

    The n-gram check (``min_distinct`` of the character ``n``-grams distinct) catches loops whose copies
    differ a little; it applies from 40 characters on, where real sentences stay well above it.
    """
    text = " ".join(answer.split())
    loop = _LOOP.search(text)
    if loop and _content(loop.group(1)):
        repeats = len(loop.group(0)) // max(len(loop.group(1)), 1)
        return f"repetition loop: {loop.group(1).strip()!r} repeated about {repeats} times"
    run = _CHAR_RUN.search(text)
    if run:
        return f"repetition loop: {run.group(1)!r} repeated {len(run.group(0))} times"
    chars = [ch for ch in text if not ch.isspace()]
    if len(chars) >= 40:
        grams = [tuple(chars[i: i + n]) for i in range(len(chars) - n + 1)]
        distinct = len(set(grams)) / len(grams)
        if distinct < min_distinct:
            return f"repetition: only {distinct:.0%} of character {n}-grams are distinct"
    return None


_NOUN_START = ("N", "SL", "SN", "SH", "XPN", "MM")


def word_salad(answer: str, min_modifiers: int = 3, max_dangling: float = 0.5) -> str | None:
    """Real words in no grammatical order: most adnominal forms (-는/-ㄴ/-ㄹ) are not followed by a noun.

    In Korean an adnominal ending (kiwipiepy tag ETM: 들뜨"는", 주입"한") modifies the next word, a noun;
    a shuffle of real words leaves most of them dangling before verbs, adverbs or the next sentence.
    Applies from ``min_modifiers`` adnominal words on; the last word is never counted (a cut answer).
    """
    words = [w for w in _eojeols(answer) if w]
    modifiers = dangling = 0
    for i, word in enumerate(words[:-1]):
        if word[-1].tag != "ETM":
            continue
        modifiers += 1
        j = i + 1
        while j < len(words) - 1 and words[j][-1].tag == "ETM":  # stacked modifiers: 묻힌 부드러운 천
            j += 1
        dangling += not words[j][0].tag.startswith(_NOUN_START)
    if modifiers >= min_modifiers and dangling / modifiers > max_dangling:
        return f"word salad: {dangling} of {modifiers} adnominal words are not followed by a noun"
    return None


def _eojeols(text: str) -> list[list]:
    """Morphemes grouped by the space-separated word they belong to (the shared analyser, loraops.korean)."""
    from loraops.core.korean import analyser

    groups: dict[tuple[int, int], list] = {}
    for token in analyser().tokenize(text):  # word_position restarts with each sentence
        if token.tag not in ("SF", "SP", "SS", "SE", "SO", "SW"):
            groups.setdefault((token.sent_position, token.word_position), []).append(token)
    return [groups[k] for k in sorted(groups)]


def wrong_script(answer: str, reference: str, min_share: float = 0.3) -> str | None:
    """The reference is Korean text and the answer mostly is not."""
    if hangul_share(reference) < 0.5:
        return None
    share = hangul_share(answer)
    return f"wrong script: {share:.0%} of the letters are Hangul; the reference is Korean" if share < min_share else None


def absurd_length(answer: str, reference: str, factor: int = 10, slack: int = 200) -> str | None:
    """Longer than ``factor`` × the reference plus ``slack`` characters, or a single character."""
    size, ref = len(_content(answer)), len(_content(reference))
    if size > factor * ref + slack:
        return f"absurd length: {size} characters for a {ref}-character reference"
    if size < 2 <= ref:
        return f"absurd length: {size} character"
    return None


def detect(answer: str, reference: str = "") -> str | None:
    """The first reason ``answer`` is degenerate, or ``None`` when it is fit to score."""
    answer = unicodedata.normalize("NFC", answer)
    reference = unicodedata.normalize("NFC", reference)
    for check in (empty, undecodable, broken_syllables, repetition, word_salad):
        reason = check(answer)
        if reason:
            return reason
    for paired in (wrong_script, absurd_length):
        reason = paired(answer, reference)
        if reason:
            return reason
    return None


def clean(text: str) -> tuple[str, int]:
    """The text without undecodable characters and control characters (all but newline and tab: a random or broken
    model emits NUL, DEL, lone carriage returns, which also break the CSV tables), and how many were dropped."""
    kept = "".join(ch for ch in text.translate(_LINE_BREAKS) if ch != REPLACEMENT and not "\ud800" <= ch <= "\udfff"
                   and (ch in "\n\t" or unicodedata.category(ch) != "Cc"))
    return kept, len(text) - len(kept)


_LINE_BREAKS = str.maketrans({"\u2028": "\n", "\u2029": "\n", "\u0085": "\n"})
