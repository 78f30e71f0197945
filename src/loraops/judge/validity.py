"""Metric validity, measured on Korean: does a metric order graded answers the way a reader would?

The probe set (``probes/ko_graded.jsonl``, written for this project) gives each reference a paraphrase
and an answer on the same topic that does not answer it; the references of other categories serve as
unrelated answers; garbage is made from the references the way an untrained model writes (loops,
U+FFFD, broken syllables, jamo and stray Latin, word salad of real words); empty answers complete the
tiers. Users add their own labelled pairs (``eval.probe_path``). For every metric this measures how
often it orders the tiers correctly, both on the bare metric and as the evaluation scores (after the
degenerate check). A metric below the thresholds may not be the gate metric.
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from loraops.core.config import EvalSection
from loraops.core.paths import user_cache
from loraops.judge.degenerate import detect
from loraops.judge.metrics import ENCODER_KEYS, MetricError, MetricPack, family_of

BUILTIN = Path(__file__).parent / "probes" / "ko_graded.jsonl"
TIERS = ("paraphrase", "same_topic", "unrelated", "garbage", "empty")
ON_TOPIC = ("paraphrase", "same_topic")
# (name, better tiers, worse tiers, counts a shared 0 as correct): the orderings reported per metric.
# "unrelated>garbage" is reported, not required: an unrelated answer and a salad of unrelated words are
# equally wrong for the question, and which reads better is fluency, which no reference metric judges.
ORDERS = (
    ("paraphrase>unrelated", ("paraphrase",), ("unrelated",), False),
    ("paraphrase>same_topic", ("paraphrase",), ("same_topic",), False),
    ("same_topic>unrelated", ("same_topic",), ("unrelated",), False),
    ("real>garbage", ON_TOPIC, ("garbage", "empty"), True),
    ("unrelated>garbage", ("unrelated",), ("garbage", "empty"), True),
)
PROBE_SEED = 0  # the garbage is drawn once, the same for every run: the probe set is fixed, its figures too
_RARE = "넀톛뷁햏똠쌰뙇놬뜳쨖"  # syllables outside KS X 1001, as byte-level noise decodes


class ProbeError(MetricError):
    """A probe file is missing, unreadable or lacks a column; the message names the file and row."""


@dataclass
class Validity:
    """Per metric: ordering accuracies raw and as scored, and whether it may be the gate metric."""

    table: pd.DataFrame  # one row per metric: metric, <order> (as scored), <order>_raw, identity, valid
    pairs: int

    def of(self, metric: str) -> dict[str, Any]:
        return self.table.set_index("metric").loc[metric].to_dict()


def _garbage(reference: str, salad_words: list[str], rng: random.Random) -> list[str]:
    words = reference.split()
    head = " ".join(words[:2])
    loop = " ".join([head] * 8)
    fffd = " ".join(w[: len(w) // 2] + "\ufffd\ufffd" + w[len(w) // 2:] for w in words)
    broken = " ".join(rng.choice(_RARE) + w[:1] + rng.choice(_RARE) for w in words)
    noise = " ".join(rng.choice(["ㅂㅈ", "ㄷㄱ8", "P", "G0", "ㅋㅋ", "xq"]) for _ in words)
    salad = " ".join(rng.sample(salad_words, k=min(len(words) + 2, len(salad_words))))
    return [loop, fffd, broken, noise, salad]


def builtin_pairs() -> pd.DataFrame:
    """The built-in probe set as (reference, candidate, tier, category) rows; every other-category reference is unrelated."""
    entries = [json.loads(line) for line in BUILTIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(PROBE_SEED)
    rows = []
    for entry in entries:
        ref, cat = entry["reference"], entry["category"]
        others = [e for e in entries if e["category"] != cat]
        salad_words = [w for e in others for w in e["reference"].split()]
        rows.append((ref, entry["paraphrase"], "paraphrase", cat))
        rows.append((ref, entry["same_topic"], "same_topic", cat))
        rows += [(ref, e["reference"], "unrelated", cat) for e in others]
        rows += [(ref, g, "garbage", cat) for g in _garbage(ref, salad_words, rng)]
        rows += [(ref, "", "empty", cat), (ref, " . ", "empty", cat)]
    return pd.DataFrame(rows, columns=["reference", "candidate", "tier", "category"])


def read_pairs(path: Path) -> pd.DataFrame:
    """User probe pairs from CSV or JSONL with columns reference, candidate, tier (optional category).

    Raises:
        ProbeError: missing or unreadable file, a missing column, an empty reference or an unknown tier.
    """
    if not path.exists():
        raise ProbeError(f"eval.probe_path: {path} not found")
    try:
        frame = (pd.read_json(path, lines=True, dtype=str) if path.suffix in (".jsonl", ".json")
                 else pd.read_csv(path, dtype=str, keep_default_na=False))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path}: not a readable probe file: {exc}") from None
    missing = [c for c in ("reference", "candidate", "tier") if c not in frame.columns]
    if missing:
        raise ProbeError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")
    frame = frame.fillna("")
    for index, row in frame.iterrows():
        line = index + (2 if path.suffix == ".csv" else 1)
        if row["tier"] not in TIERS:
            raise ProbeError(f"{path}: row {line}: tier {row['tier']!r} is not one of {', '.join(TIERS)}")
        if not str(row["reference"]).strip():
            raise ProbeError(f"{path}: row {line}: empty reference")
    if "category" not in frame.columns:
        frame["category"] = ""
    return frame[["reference", "candidate", "tier", "category"]]


def probe_pairs(cfg: EvalSection) -> pd.DataFrame:
    """The built-in pairs plus the user's (``eval.probe_path``)."""
    frames = [builtin_pairs()]
    if cfg.probe_path:
        frames.append(read_pairs(Path(cfg.probe_path)))
    return pd.concat(frames, ignore_index=True)


def _accuracy(scores: pd.Series, pairs: pd.DataFrame, better: tuple[str, ...], worse: tuple[str, ...],
              zero_tie_ok: bool) -> float:
    """Share of (better, worse) candidate pairs of one reference that the scores order correctly; ties count ½."""
    total = correct = 0.0
    frame = pairs.assign(score=scores.to_numpy())
    for _, group in frame.groupby("reference", sort=False):
        hi = group.loc[group["tier"].isin(better), "score"].to_numpy()
        lo = group.loc[group["tier"].isin(worse), "score"].to_numpy()
        if not len(hi) or not len(lo):
            continue
        diff = hi[:, None] - lo[None, :]
        tie = abs(diff) <= 1e-9
        zero = tie & (abs(lo[None, :]) <= 1e-9) if zero_tie_ok else tie & False
        correct += float((diff > 1e-9).sum() + zero.sum() + 0.5 * (tie & ~zero).sum())
        total += diff.size
    return correct / total if total else float("nan")


def measure(pack: MetricPack, cfg: EvalSection) -> Validity:
    """Order the probe tiers with every metric of ``pack``; decide which metrics are valid."""
    pairs = probe_pairs(cfg)
    refs, cands = list(pairs["reference"]), list(pairs["candidate"])
    raw = pack.score(cands, refs)
    flagged = [detect(c, r) is not None for c, r in zip(cands, refs)]
    unique_refs = list(dict.fromkeys(refs))
    same = pack.score(unique_refs, unique_refs)
    nfd = pack.score([unicodedata.normalize("NFD", r) for r in unique_refs], unique_refs)
    rows = []
    for column in pack.columns:
        raw_scores = pd.Series(raw[column])
        scored = raw_scores.where(~pd.Series(flagged), 0.0)
        row: dict[str, Any] = {"metric": column}
        for name, better, worse, zero_ok in ORDERS:
            row[name] = round(_accuracy(scored, pairs, better, worse, zero_ok), 4)
            row[f"{name}_raw"] = round(_accuracy(raw_scores, pairs, better, worse, False), 4)
        row["identity"] = round(sum(abs(a - 1) <= 1e-4 and abs(a - b) <= 1e-4 for a, b in zip(same[column], nfd[column]))
                                / len(unique_refs), 4)
        row["valid"] = bool(row["paraphrase>unrelated"] >= cfg.min_paraphrase_over_unrelated
                            and row["real>garbage"] >= cfg.min_real_over_garbage and row["identity"] == 1.0)
        rows.append(row)
    return Validity(pd.DataFrame(rows), pairs=len(pairs))


_MEASURED_BY = ("validity.py", "metrics.py", "degenerate.py")
_PACKAGES = ("kiwipiepy", "kiwipiepy-model", "sentence-transformers", "bert-score", "transformers", "torch", "sacrebleu",
             "rouge-score")


def fingerprint(cfg: EvalSection, device: str) -> str:
    """Everything a validity measurement depends on besides which metrics it measures: the probe pairs, the metric
    settings and thresholds, the code that scores (its source) and the versions of the libraries behind the metrics,
    and the device. One metric's rows do not depend on which other metrics are measured with it."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    digest.update(probe_pairs(cfg).to_csv(index=False).encode())
    digest.update(cfg.model_dump_json(exclude={"metrics", "max_samples", "max_new_tokens", "batch_size", "stop_strings",
                                               "bootstrap_samples", "min_slice_size", "self_test", "tone"}).encode())
    for name in _MEASURED_BY:
        digest.update((Path(__file__).parent / name).read_bytes())
    for package in _PACKAGES:
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    digest.update(device.encode())
    return digest.hexdigest()[:32]


def _kept(cfg: EvalSection, key: str) -> dict[str, Path]:
    """Where each metric of ``cfg.metrics`` keeps its rows measured with the settings :func:`fingerprint` ``key``."""
    return {name: user_cache("validity") / f"{key}-{name}.json" for name in dict.fromkeys(cfg.metrics)}


def is_measured(cfg: EvalSection, device: str) -> bool:
    """Whether every metric of ``cfg.metrics`` has been measured with these settings on this machine."""
    return all(path.exists() for path in _kept(cfg, fingerprint(cfg, device)).values())


def measure_cached(cfg: EvalSection, device: str, pack: MetricPack | None = None) -> tuple[Validity, bool]:
    """:func:`measure`, kept on disk per metric by :func:`fingerprint`: the measurement is deterministic (a fixed probe
    set, fixed seeds), so the same inputs give the same rows, and a run's pre-training check, its evaluate and
    ``loraops evaluate --self-test`` share them; only the metrics not measured yet are measured. Processes that
    measure the same settings at once take turns (a file lock): one measures, the others read what it kept.
    Returns the validity and whether all of it came from the cache."""
    import fcntl

    from loraops.core.utils import atomic_write

    key = fingerprint(cfg, device)
    paths = _kept(cfg, key)
    folder = user_cache("validity")
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    pairs = 0
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, path in paths.items():
            try:
                kept = json.loads(path.read_text(encoding="utf-8"))
                rows[name], pairs = list(kept["table"]), int(kept["pairs"])
            except (OSError, ValueError, KeyError):  # not measured yet on this machine, or a torn file: measure
                pass
        missing = [name for name in paths if name not in rows]
        if missing:
            narrow = cfg.model_copy(update={"metrics": missing})
            measured = measure(pack.only(missing) if pack else MetricPack(narrow, device=device), narrow)
            records = measured.table.to_dict("records")
            for name in missing:
                rows[name] = [row for row in records if family_of(row["metric"]) == name]
                atomic_write(paths[name], json.dumps({"table": rows[name], "pairs": measured.pairs}))
            pairs = measured.pairs
    table = pd.DataFrame([row for name in paths for row in rows[name]])
    return Validity(table, pairs=pairs), not missing


def require_valid(validity: Validity, metric: str, cfg: EvalSection) -> None:
    """Stop when the gate metric fails the probes.

    Raises:
        MetricError: naming ``registry.gate.metric`` (and the encoder key when an encoder is the cause) and the figures.
    """
    if metric.startswith("judge_"):
        return  # an LLM judge is held to its measured agreement with the raters instead (`loraops judge calibrate`)
    if metric not in set(validity.table["metric"]):
        raise MetricError(f"registry.gate.metric: {metric!r} is not computed by eval.metrics")
    row = validity.of(metric)
    if row["valid"]:
        return
    family = family_of(metric) or metric
    encoder = f" ({ENCODER_KEYS[family]}={getattr(cfg, ENCODER_KEYS[family].split('.')[1])!r})" if family in ENCODER_KEYS else ""
    failures = []
    if row["paraphrase>unrelated"] < cfg.min_paraphrase_over_unrelated:
        failures.append(f"it orders a paraphrase above an unrelated answer {row['paraphrase>unrelated']:.1%} of the time "
                        f"(eval.min_paraphrase_over_unrelated: {cfg.min_paraphrase_over_unrelated:.0%})")
    if row["real>garbage"] < cfg.min_real_over_garbage:
        failures.append(f"it orders on-topic answers above garbage or empty ones {row['real>garbage']:.1%} of the time "
                        f"(eval.min_real_over_garbage: {cfg.min_real_over_garbage:.0%})")
    if row["identity"] < 1:
        failures.append(f"identical texts score 1 (and NFC = NFD) for only {row['identity']:.0%} of the references")
    raise MetricError(f"registry.gate.metric: {metric!r}{encoder} is not valid on the Korean probes: " + "; ".join(failures)
                      + ". Run `loraops evaluate --self-test` and pick a valid metric")


def describe(validity: Validity) -> str:
    """The self-test table as text: per metric, how often each ordering is right (raw in brackets)."""
    names = [name for name, *_ in ORDERS]
    lines = [f"{validity.pairs} probe pairs; accuracy as scored (after the degenerate check), bare metric in brackets",
             f"{'metric':<15}" + "".join(f"{n:>24}" for n in names) + f"{'identity':>10}  verdict"]
    for _, row in validity.table.iterrows():
        cells = "".join(f"{row[n]:>14.3f} [{row[n + '_raw']:.3f}]" for n in names)
        verdict = "valid" if row["valid"] else "NOT VALID for Korean"
        lines.append(f"{row['metric']:<15}{cells}{row['identity']:>10.2f}  {verdict}")
    return "\n".join(lines)


def check_gate(params: Any) -> dict[str, Any]:
    """Before training: every configured encoder loads, the probe file reads, and the gate metric is valid.

    Only the gate metric is measured here (cheap); `evaluate` measures them all. Both keep what they measured
    (:func:`measure_cached`); the encoders are loaded here unless evaluate already measured them all on this machine.

    Raises:
        MetricError: an encoder that cannot load (naming its key), a bad probe file (naming file and row), or
            a gate metric that is not valid (naming ``registry.gate.metric`` and the figures).
    """
    from loraops.core.utils import pick_device

    metric, device = params.registry.gate.metric, pick_device(params.base.device)
    if params.eval.probe_path:
        read_pairs(Path(params.eval.probe_path))
    if not is_measured(params.eval, device):
        MetricPack(params.eval, device=device)  # every configured encoder must load now, not after training
    cfg = params.eval.model_copy(update={"metrics": [family_of(metric)]})
    measured, _ = measure_cached(cfg, device)
    require_valid(measured, metric, params.eval)
    return measured.of(metric)
