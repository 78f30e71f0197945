"""Summaries of a per-question score table: means, paired bootstrap intervals, slices, report, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loraops.core.config import Params
from loraops.core.paths import EVAL_TABLE, STAGES
from loraops.core.results import Comparison, EvalSummary, Promotion, Slice


def paired_bootstrap(deltas: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """Seeded percentile bootstrap 95% interval of the mean of paired deltas."""
    if len(deltas) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(deltas), size=(samples, len(deltas)))
    means = deltas[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(a: pd.Series, b: pd.Series, samples: int, seed: int, tie: float = 1e-9) -> Comparison:
    """Paired comparison b − a: means, delta, bootstrap interval, win/tie/loss counts. A pair with a missing score
    (a judge reply that did not parse) is left out of both sides."""
    kept = (a.notna() & b.notna()).to_numpy()
    a, b = a[kept], b[kept]
    deltas = (b - a).to_numpy(dtype=float)
    low, high = paired_bootstrap(deltas, samples, seed)
    return Comparison(
        base=round(float(a.mean()), 6), tuned=round(float(b.mean()), 6),
        delta=round(float(deltas.mean()), 6) if len(deltas) else 0.0,
        ci95=(round(low, 6), round(high, 6)),
        wins=int((deltas > tie).sum()), ties=int((abs(deltas) <= tie).sum()), losses=int((deltas < -tie).sum()),
    )


def summarize(table: pd.DataFrame, columns: list[str], slice_columns: list[str], samples: int, seed: int,
              min_slice: int) -> EvalSummary:
    """The core of ``metrics/eval.json`` from a per-question table with ``base_<m>``/``tuned_<m>`` columns: means,
    gains and intervals per metric, and per slice (each value of each of ``slice_columns``) the means."""
    slices: dict[str, dict[str, Slice]] = {}
    for column in slice_columns:
        slices[column] = {}
        for value, part in table.groupby(column, sort=True):
            means = {m: compare(part[f"base_{m}"], part[f"tuned_{m}"], samples, seed).model_dump(
                include={"base", "tuned", "delta"}) for m in columns}
            slices[column][str(value)] = Slice.model_validate({"n": int(len(part)), "small": bool(len(part) < min_slice),
                                                               **means})
    return EvalSummary(
        n=int(len(table)),
        empty_answers={"base": int((table["base_answer"].str.strip() == "").sum()),
                       "tuned": int((table["tuned_answer"].str.strip() == "").sum())},
        metrics={m: compare(table[f"base_{m}"], table[f"tuned_{m}"], samples, seed) for m in columns},
        slices=slices,
    )


def flat_metrics(summary: EvalSummary, gate_metric: str | None = None) -> dict[str, float]:
    """The run's MLflow metrics, in chart sections that MLflow orders by name:

    - ``gate/``: the gate metric (tuned), its base value, gain and 95% interval, degenerate rates, n;
    - ``train/`` (logged by tracking.log_curves): the loss and learning-rate curves;
    - ``tuned/<metric>`` and ``vs_base/<metric>`` (the gain) for every metric.

    Base values, intervals, wins/ties/losses, slices and validity go to :func:`details` (a JSON artifact
    and a table), so the charts open on the headline and the curves, not on a hundred single bars.
    """
    gate = summary.primary(gate_metric)
    stats = summary.metrics[gate]
    flat: dict[str, float] = {f"gate/{gate}": stats.tuned, f"gate/{gate}_base": stats.base,
                              f"gate/{gate}_delta": stats.delta, f"gate/{gate}_delta_ci_low": stats.ci95[0],
                              f"gate/{gate}_delta_ci_high": stats.ci95[1], "gate/n_questions": summary.n}
    for model, figures in (summary.degenerate or {}).items():
        flat["gate/degenerate_rate" if model == "tuned" else f"gate/degenerate_rate_{model}"] = figures.rate
    for metric, comparison in summary.metrics.items():
        flat[f"tuned/{metric}"], flat[f"vs_base/{metric}"] = comparison.tuned, comparison.delta
    for arm, value in (summary.arms or {}).get("means", {}).get(gate, {}).items():
        flat[f"arms/{arm.replace('+', '_with_')}/{gate}"] = value
    for key, value in ((summary.judge or {}).get("usage") or {}).items():
        flat[f"judge/{key}"] = value
    for key in ("hit@k", "mrr"):
        if key in (summary.retrieval or {}):
            flat[f"retrieval/{key.replace('@', '_at_')}"] = (summary.retrieval or {})[key]
    return flat


def details(summary: EvalSummary) -> tuple[dict[str, Any], pd.DataFrame]:
    """What the headline leaves out: per metric intervals and wins/ties/losses, validity, degenerate reasons;
    and one row per slice × metric (base, tuned, delta) for a table artifact."""
    dumped = summary.model_dump(mode="json", exclude_unset=True)
    out = {"metrics": dumped["metrics"], "validity": dumped.get("validity", {}), "degenerate": dumped.get("degenerate", {}),
           "empty_answers": dumped["empty_answers"], "sample": dumped.get("sample", {})}
    rows = [{"slice": column, "value": value, "n": part.n, "metric": metric, **means.model_dump()}
            for column, groups in summary.slices.items() for value, part in groups.items()
            for metric in summary.metrics if (means := part.metric(metric)) is not None]
    return out, pd.DataFrame(rows)


def headline(summary: EvalSummary) -> str:
    """Base vs tuned means, one line per metric, then the degenerate counts."""
    validity = summary.validity or {}
    lines = [f"{'metric':<14}{'base':>9}{'tuned':>9}{'delta':>9}   95% CI of delta"]
    for metric, s in summary.metrics.items():
        note = "   (not valid on Korean)" if metric in validity and not validity[metric]["valid"] else ""
        lines.append(f"{metric:<14}{s.base:>9.4f}{s.tuned:>9.4f}{s.delta:>+9.4f}   "
                     f"[{s.ci95[0]:+.4f}, {s.ci95[1]:+.4f}]{note}")
    if summary.degenerate:
        lines.append(f"degenerate answers: base {summary.degenerate['base'].count}/{summary.n}, "
                     f"tuned {summary.degenerate['tuned'].count}/{summary.n} (scored 0)")
    if summary.arms:
        lines += ["", "base and tuned above answer with retrieval; the four arms:", *arms_lines(summary)]
    return "\n".join(lines)


ARMS = ("base", "tuned", "base+retrieval", "tuned+retrieval")


def arms_lines(summary: EvalSummary) -> list[str]:
    """The four arms (rag.enabled) as a markdown table: each metric's mean per arm, what retrieval adds to the
    tuned model (with its interval), and retrieval hit@k / MRR when the gold documents are known."""
    lines = ["| metric | " + " | ".join(ARMS) + " | retrieval gain (tuned) | 95% CI |", "|---|" + "---|" * (len(ARMS) + 2)]
    arms = summary.arms or {"means": {}}
    for metric, means in arms["means"].items():
        gain = arms["retrieval_gain"][metric]["tuned"]
        lines.append(f"| {metric} | " + " | ".join(f"{means[arm]:.4f}" for arm in ARMS) +
                     f" | {gain['delta']:+.4f} | [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}] |")
    quality = summary.retrieval or {}
    if "hit@k" in quality:
        lines += ["", f"Retrieval ({quality['mode']}, k={quality['k']}): hit@k {quality['hit@k']:.3f}, "
                      f"MRR {quality['mrr']:.3f} on {quality['n_with_gold']} questions with a known gold document."]
    return lines


EXIT_CODES = {"Promoted": 0, "Registered": 0, "Unchanged": 0, "Refused": 3, "Worse than base": 4}
"""Exit codes of `loraops run`, `sweep` and `promote` per outcome (2 stays bad input, 130 an interrupt)."""


def exit_code(name: str) -> int:
    """The documented exit code of outcome ``name`` (see :data:`EXIT_CODES`)."""
    return EXIT_CODES.get(name, 1)


def versus(gate: Promotion) -> str:
    """The comparison that decided: the gate metric of the reference (production, or the base when there is none)
    against the candidate's, with the gain's 95% interval."""
    decision = gate.decision
    if decision is None:
        return f"v{gate.version}"
    f = decision.figures
    if "gain" not in f:
        return (decision.reasons or [decision.against])[0]
    low, high = f["ci95"]
    against = "base" if decision.against.startswith("base model") else decision.against
    return (f"{f['metric']} {against} {f['reference']:.4f} → v{gate.version} {f['candidate']:.4f} "
            f"({f['gain']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}])")


def outcome(summary: EvalSummary, primary: str, gate: Promotion | None,
            awaiting_approval: bool = False) -> tuple[str, str]:
    """The run's outcome as a Prefect state name and a one-line message (its exit code: :func:`exit_code`).

    ``Worse than base`` when the tuned model scores measurably below its base on the gate metric (the
    95% interval of the change lies below 0) or answers degenerately more often; else ``Unchanged`` when the
    candidate already is production (a no-op rerun), ``Refused`` when the gate refused, else ``Promoted`` or
    ``Registered``. Once gated, the message quotes the comparison that decided (production, or the base when
    there is none) and, for a refusal, the first reason.
    """
    stats = summary.metrics[primary]
    degenerate = summary.degenerate or {}
    rates = [degenerate[m].rate if m in degenerate else 0.0 for m in ("base", "tuned")]
    figures = f"{primary} base {stats.base:.4f} → tuned {stats.tuned:.4f} ({stats.delta:+.4f})"
    if stats.ci95[1] < 0 or rates[1] > rates[0]:
        return "Worse than base", f"the tuned model is worse than its base: {figures}; degenerate {rates[0]:.1%} → {rates[1]:.1%}"
    if gate is not None and gate.previous == gate.version:
        return "Unchanged", f"v{gate.version} is already production; nothing moved: {figures}"
    if gate is not None and not gate.promoted:
        against = gate.decision.against if gate.decision else "production"
        first = next(iter((gate.decision.failures or gate.decision.reasons) if gate.decision else []), "")
        why = f"; {first}" if first and first != versus(gate) else ""
        return "Refused", f"the gate refused v{gate.version} vs {against}: {versus(gate)}{why}"
    if gate is not None:
        return "Promoted", f"v{gate.version} promoted to production: {versus(gate)}"
    if awaiting_approval:
        return "Registered", (f"registered; production moves only with a reviewer's approval (registry.gate."
                              f"require_approval): run the promote flow (`loraops promote`): {figures}")
    return "Registered", f"registered (registry.auto_promote is off): {figures}"


def version_description(summary: EvalSummary, primary: str, run_id: str, lineage: dict[str, Any] | None = None) -> str:
    """The model version's description: what the adapter scored, from which run, made of what."""
    stats = summary.metrics[primary]
    lines = [f"LoRA adapter from MLflow run {run_id}.", "",
             f"Gate metric **{primary}**: base {stats.base:.4f} → tuned {stats.tuned:.4f} "
             f"(Δ {stats.delta:+.4f}, 95% CI [{stats.ci95[0]:+.4f}, {stats.ci95[1]:+.4f}]) on {summary.n} test questions."]
    if summary.degenerate:
        lines.append(f"Degenerate answers: base {summary.degenerate['base'].count}, "
                     f"tuned {summary.degenerate['tuned'].count}.")
    if lineage:
        commit = (lineage.get("git_commit") or "unknown")[:12] + (" + uncommitted diff" if lineage.get("git_dirty") else "")
        data = ", ".join(f"`{path}` md5 {md5[:8]}" for path, md5 in list((lineage.get("data_md5") or {}).items())[:1])
        lines += ["", f"Lineage: base `{lineage.get('base_model')}` ({str(lineage.get('base_revision'))[:19]}), "
                      f"code {commit}, data {data or 'unknown'}, seed {lineage.get('seed')}; "
                      "the full card is the run's `lineage.json`."]
    return "\n".join(lines)


def _cell(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown(summary: EvalSummary, table: pd.DataFrame, primary: str, top: int = 10) -> str:
    """``reports/eval.md``: headline, slices, intervals, biggest wins and losses."""
    validity = summary.validity or {}
    room = summary.answer_room or {}
    cut = ([f"**Answers cut short:** {room['references_longer']:.0%} of the reference answers are longer than "
            f"eval.max_new_tokens={room['max_new_tokens']} tokens (median {room['reference_tokens_median']:.0f}, p90 "
            f"{room['reference_tokens_p90']:.0f}); the model's answers stop there.", ""]
           if room.get("references_longer", 0) > 0.25 else [])
    lines = ["# Evaluation: base vs tuned", "", _sample_line(summary), "", *_degenerate_lines(summary), "", *cut,
             f"Gate metric: **{primary}**.", "",
             "| metric | base | tuned | Δ (tuned − base) | 95% CI of Δ | wins / ties / losses | valid on Korean probes |",
             "|---|---|---|---|---|---|---|"]
    for metric, s in summary.metrics.items():
        v = validity.get(metric)
        verdict = "—" if v is None else ("yes" if v["valid"] else f"**no** (paraphrase>unrelated {v['paraphrase>unrelated']:.2f})")
        lines.append(f"| {metric} | {s.base:.4f} | {s.tuned:.4f} | {s.delta:+.4f} | "
                     f"[{s.ci95[0]:+.4f}, {s.ci95[1]:+.4f}] | {s.wins} / {s.ties} / {s.losses} | {verdict} |")
    if validity and not all(v["valid"] for v in validity.values()):
        lines += ["", "Metrics marked **no** do not order graded Korean answers reliably (`loraops evaluate --self-test`); "
                  "read their figures as noise."]
    lines += judge_lines(summary)
    if summary.arms:
        lines += ["", "## Retrieval: the four arms", "",
                  "The table above compares base and tuned, both **with** retrieval (the configuration registered and "
                  "gated). Without retrieval, the prompt is data.template; with it, rag.template with the passages.", "",
                  *arms_lines(summary)]
    for column, groups in summary.slices.items():
        lines += ["", f"## By {column} ({primary})", "", "| value | n | base | tuned | Δ | note |", "|---|---|---|---|---|---|"]
        for value, part in groups.items():
            means = part.metric(primary)
            if means is None:
                continue
            note = "small slice" if part.small else ""
            lines.append(f"| {value} | {part.n} | {means.base:.4f} | {means.tuned:.4f} | {means.delta:+.4f} | {note} |")
    delta = table[f"tuned_{primary}"] - table[f"base_{primary}"]
    for title, order in (("wins", delta[delta > 0].sort_values(ascending=False)), ("losses", delta[delta < 0].sort_values())):
        lines += ["", f"## Top {top} {title} ({primary})", "", "| Δ | question | reference | base | tuned |", "|---|---|---|---|---|"]
        for index in order.index[:top]:
            row = table.loc[index]
            lines.append(f"| {delta[index]:+.3f} | {_cell(row['question'])} | {_cell(row['reference'])} | "
                         f"{_cell(row['base_answer'])} | {_cell(row['tuned_answer'])} |")
    return "\n".join(lines) + "\n"


def judge_lines(summary: EvalSummary) -> list[str]:
    """What the LLM judge was and cost (``judge_*`` rows above are its 1–5 means; validity on Korean is its
    calibration against the raters, `loraops judge calibrate`, not the probes)."""
    judge = summary.judge
    if not judge:
        return []
    usage = judge.get("usage", {})
    lines = ["", "## LLM judge", "",
             f"`judge_*` rows are the 1–5 rubric means of **{judge['model']}** at `{judge['base_url']}` (judge "
             f"`{judge['fingerprint']}`); a degenerate answer scores 1 without being sent. Its agreement with the raters "
             "is measured by `loraops judge calibrate`, not by the probes.", "",
             f"Cost: {usage.get('requests', 0)} requests, {usage.get('cached', 0)} replies from the cache, "
             f"{usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion tokens; "
             f"{usage.get('unparsed', 0)} replies could not be parsed (left out)."]
    for arm, figures in (judge.get("arms") or {}).items():
        pairwise = figures.get("pairwise")
        if pairwise:
            rate = pairwise["position_bias_rate"]
            lines.append(f"Pairwise ({arm}): {pairwise['pairs']} pairs asked in both orders; the pick flipped with the "
                         f"order on {'—' if rate is None else format(rate, '.0%')} of them (counted as ties).")
    return lines


def _sample_line(summary: EvalSummary) -> str:
    sample = summary.sample
    if sample is not None and sample.n < sample.of:
        return (f"Test questions: {sample.n}, a seeded sample (seed {sample.seed}) of {sample.of}, "
                f"stratified by {sample.stratified_by}.")
    return f"Test questions: {summary.n} (the whole test split)."


def _degenerate_lines(summary: EvalSummary) -> list[str]:
    """How many answers were degenerate (scored 0) per model, and why."""
    lines = []
    for model, stats in (summary.degenerate or {}).items():
        why = ", ".join(f"{k} {v}" for k, v in stats.reasons.items()) or "none"
        lines.append(f"- {model}: {stats.count} degenerate answers ({stats.rate:.1%}) scored 0 — {why}")
    return lines


def korean_font() -> None:
    """Draw with NanumGothic, shipped in the PyPI package koreanize-matplotlib (offline), so Hangul labels render."""
    from importlib.resources import files

    import matplotlib
    from matplotlib import font_manager

    matplotlib.use("Agg")
    if "NanumGothic" not in {f.name for f in font_manager.fontManager.ttflist}:
        font_manager.fontManager.addfont(str(files("koreanize_matplotlib") / "fonts" / "NanumGothic.ttf"))
    matplotlib.rcParams["font.family"] = "NanumGothic"
    matplotlib.rcParams["axes.unicode_minus"] = False  # NanumGothic has no U+2212


def plots(summary: EvalSummary, table: pd.DataFrame, primary: str, out_dir: Path) -> list[Path]:
    """PNG plots: score distributions base vs tuned, per-category deltas. Returns the files written."""
    korean_font()
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(table[f"base_{primary}"].min(), table[f"tuned_{primary}"].min()), 1.0, 21)
    ax.hist(table[f"base_{primary}"], bins=bins.tolist(), alpha=0.6, label="base")
    ax.hist(table[f"tuned_{primary}"], bins=bins.tolist(), alpha=0.6, label="tuned")
    ax.set_xlabel(primary)
    ax.set_ylabel("questions")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "score_hist.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    for column, groups in summary.slices.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        names = [n for n in groups if groups[n].metric(primary) is not None]
        ax.bar(range(len(names)), [getattr(groups[n].metric(primary), "delta", 0.0) for n in names])
        ax.set_xticks(range(len(names)), [f"{n} (n={groups[n].n})" for n in names], rotation=30, ha="right")
        ax.set_ylabel(f"Δ {primary} (tuned - base)")
        ax.set_title(f"{primary} gain per {column}", fontsize=10)
        fig.tight_layout()
        written.append(out_dir / f"delta_by_{column}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def summary_markdown(params: Params, summary: EvalSummary, run_id: str, tracking_uri: str,
                     registered: dict[str, Any], gate: Promotion | None, ran: dict[str, bool],
                     experiment_id: str = "0") -> str:
    """The Prefect markdown artifact: headline scores, stages run, registration and gate decision."""
    link = f"[`{run_id}`]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)" \
        if tracking_uri.startswith("http") else f"`{run_id}` (store {tracking_uri}; open it with `make ui-mlflow`)"
    lines = [f"# finetune: {params.registry.model_name} v{registered['version']}", "",
             f"MLflow run {link}; experiment `{params.registry.model_name}`.", "",
             "| stage | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES),
             "| ran | " + " | ".join("yes" if ran[s] else "skipped (unchanged)" for s in STAGES) + " |", "",
             "| metric | base | tuned | Δ | 95% CI | valid on Korean |", "|---|---|---|---|---|---|"]
    validity = summary.validity or {}
    for metric, s in summary.metrics.items():
        valid = "—" if metric not in validity else ("yes" if validity[metric]["valid"] else "no")
        lines.append(f"| {metric} | {s.base:.4f} | {s.tuned:.4f} | {s.delta:+.4f} | "
                     f"[{s.ci95[0]:+.4f}, {s.ci95[1]:+.4f}] | {valid} |")
    if summary.degenerate:
        lines += ["", f"Degenerate answers (scored 0): base {summary.degenerate['base'].count}, tuned "
                      f"{summary.degenerate['tuned'].count} of {summary.n}; gate metric `{params.registry.gate.metric}`."]
    if summary.arms:
        lines += ["", "With retrieval (rag.enabled): the scores above answer with passages; the four arms:", "",
                  *arms_lines(summary)]
    reused = " (same adapter as an existing version)" if registered.get("reused") else ""
    lines += ["", f"Registered `{registered['name']}` version {registered['version']}{reused}, alias `candidate`."]
    if gate is not None and gate.decision is not None:
        verdict = "promoted to `production`" if gate.promoted else "not promoted"
        lines += ["", f"Gate vs {gate.decision.against}: **{verdict}**. What decided: {versus(gate)} (the table above "
                      "compares with the base model).", ""]
        lines += [f"- {reason}" for reason in gate.decision.reasons]
    return "\n".join(lines) + "\n"


def top_losses(root: Path, metric: str, n: int = 10, width: int = 120) -> list[dict[str, Any]]:
    """The ``n`` questions where tuned lost most to base on ``metric`` (for a Prefect table artifact).

    Only real losses, one row per question (its worst reference), answers cut to ``width`` characters.
    """
    table = pd.read_csv(root / EVAL_TABLE, keep_default_na=False)
    table["delta"] = table[f"tuned_{metric}"] - table[f"base_{metric}"]
    worst = table[table["delta"] < 0].sort_values("delta").drop_duplicates("question").head(n)
    cut = lambda text: text if len(text) <= width else text[: width - 1] + "…"
    return [{"delta": round(float(r["delta"]), 4), "question": cut(r["question"]), "base": cut(r["base_answer"]),
             "tuned": cut(r["tuned_answer"])} for _, r in worst.iterrows()]
