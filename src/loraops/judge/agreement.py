"""How far a judge agrees with human raters, per rubric criterion, with 95% bootstrap intervals.

The unit is a rated answer: its human score is the mean over the raters who scored it (one rater's 4 and
another's 5 are a 4.5), the judge's is its 1–5 score. Per criterion:

- ``kendall_tau`` (τ-b, which corrects for ties, as 1–5 scales have many) and ``spearman`` (ρ: Pearson's r on
  average ranks): do the judge and the raters order answers alike? That is what the gate needs: it compares two
  models' answers scored by the same judge, so a judge that ranks like the raters gates like them.
- ``exact`` (the judge's score is the raters' mean rounded) and ``within_one`` (at most one point away).
- ``mean_shift``: judge mean − raters' mean (a lenient or strict judge; it does not change a ranking).
- intervals: percentile bootstrap over answers (``samples`` resamples, seeded), so the figures say how much
  ``n`` ratings can tell.

``valid`` applies :class:`~loraops.core.config.CalibrationPolicy`: at least ``min_n`` answers, the lower end of
Spearman's interval at least ``min_spearman_low``, within-one agreement at least ``min_within_one``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loraops.core.config import CalibrationPolicy


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ; NaN when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b over all pairs: (concordant − discordant) / sqrt((n0 − ties in x)(n0 − ties in y)); NaN when
    either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    upper = np.triu_indices(len(x), k=1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    untied_x, untied_y = float((dx != 0).sum()), float((dy != 0).sum())
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float((dx * dy).sum() / np.sqrt(untied_x * untied_y))


def _interval(human: np.ndarray, judge: np.ndarray, statistic: Any, samples: int, seed: int) -> list[float] | None:
    """Percentile bootstrap 95% interval of ``statistic`` over resampled answers (constant resamples are skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        pick = rng.integers(0, len(human), len(human))
        value = statistic(human[pick], judge[pick])
        if not np.isnan(value):
            values.append(value)
    if len(values) < samples / 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def _rounded(value: float | None) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def agreement(human: list[float], judge: list[float], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The figures for one criterion over paired scores (the raters' mean and the judge's score per answer)."""
    h, j = np.asarray(human, float), np.asarray(judge, float)
    n = len(h)
    out: dict[str, Any] = {"n": n, "kendall_tau": None, "kendall_tau_ci95": None, "spearman": None,
                           "spearman_ci95": None, "exact": None, "within_one": None, "mean_shift": None,
                           "rater_mean": None, "judge_mean": None}
    if n == 0:
        return out
    distance = np.abs(j - h)
    out.update(exact=_rounded(float((np.abs(j - np.floor(h + 0.5)) < 1e-9).mean())),
               within_one=_rounded(float((distance <= 1 + 1e-9).mean())),
               mean_shift=_rounded(float(j.mean() - h.mean())), rater_mean=_rounded(float(h.mean())),
               judge_mean=_rounded(float(j.mean())))
    if n >= 3:
        out.update(kendall_tau=_rounded(kendall_tau_b(h, j)), spearman=_rounded(spearman(h, j)),
                   kendall_tau_ci95=_interval(h, j, kendall_tau_b, samples, seed),
                   spearman_ci95=_interval(h, j, spearman, samples, seed + 1))
    return out


def verdict(figures: dict[str, Any], policy: CalibrationPolicy) -> tuple[bool, list[str]]:
    """Whether one criterion's figures meet the policy, and what falls short (each naming its params key)."""
    short = []
    if figures["n"] < policy.min_n:
        short.append(f"{figures['n']} rated answers (eval.judge.calibration.min_n: {policy.min_n})")
    low = (figures.get("spearman_ci95") or [None])[0]
    if low is None:
        short.append("no Spearman interval (too few answers, or the raters or the judge gave one score to all)")
    elif low < policy.min_spearman_low:
        short.append(f"Spearman {figures['spearman']:.2f} [{low:.2f}, {figures['spearman_ci95'][1]:.2f}]: the lower "
                     f"end is below eval.judge.calibration.min_spearman_low {policy.min_spearman_low:.2f}")
    if figures.get("within_one") is not None and figures["within_one"] < policy.min_within_one:
        short.append(f"within one point on {figures['within_one']:.0%} of the answers (eval.judge.calibration."
                     f"min_within_one: {policy.min_within_one:.0%})")
    return not short, short


def calibrate(pairs: dict[str, tuple[list[float], list[float]]], policy: CalibrationPolicy,
              seed: int = 0) -> dict[str, Any]:
    """Per criterion (raters' means, judge scores): the figures, ``valid`` and ``short`` (what falls short); and
    ``valid`` overall (every criterion valid)."""
    criteria: dict[str, Any] = {}
    for criterion, (human, judge) in pairs.items():
        figures = agreement(human, judge, policy.bootstrap_samples, seed)
        figures["valid"], figures["short"] = verdict(figures, policy)
        criteria[criterion] = figures
    return {"criteria": criteria, "valid": bool(criteria) and all(c["valid"] for c in criteria.values())}


def revalidate(result: dict[str, Any], policy: CalibrationPolicy) -> dict[str, Any]:
    """A recorded calibration judged again under today's thresholds (the figures do not change with them)."""
    criteria = {}
    for criterion, figures in result.get("criteria", {}).items():
        valid, short = verdict(figures, policy)
        criteria[criterion] = {**figures, "valid": valid, "short": short}
    return {**result, "criteria": criteria, "valid": bool(criteria) and all(c["valid"] for c in criteria.values())}


def describe(result: dict[str, Any]) -> str:
    """The calibration as a table: one line per criterion, then the verdict."""
    def cell(value: Any, ci: Any = None) -> str:
        if value is None:
            return "—"
        return f"{value:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")

    lines = [f"{'criterion':<14}{'n':>5}  {'Kendall τ-b [95% CI]':<24}{'Spearman ρ [95% CI]':<24}{'exact':>7}"
             f"{'±1':>7}{'shift':>8}  verdict"]
    for name, f in result["criteria"].items():
        lines.append(f"{name:<14}{f['n']:>5}  {cell(f['kendall_tau'], f['kendall_tau_ci95']):<24}"
                     f"{cell(f['spearman'], f['spearman_ci95']):<24}"
                     f"{'—' if f['exact'] is None else format(f['exact'], '.0%'):>7}"
                     f"{'—' if f['within_one'] is None else format(f['within_one'], '.0%'):>7}"
                     f"{'—' if f['mean_shift'] is None else format(f['mean_shift'], '+.2f'):>8}  "
                     + ("valid" if f["valid"] else "NOT VALID: " + "; ".join(f["short"])))
    return "\n".join(lines)
