"""Stage `evaluate`: answer the test questions with the base model and the tuned adapter, then score.

One model is loaded: base answers come from the same PeftModel with its adapter disabled, so base and
tuned share weights, tokenizer, prompt template and decoding settings. Generation is batched with left
padding over length-sorted prompts, greedy by default.

With ``rag.enabled`` the prompts carry each question's passages (stage `index`), and four arms answer the
same questions: base and tuned with retrieval (the configuration being registered: the table's ``base_*`` and
``tuned_*`` columns, what the gate compares) and without it (``*_without_retrieval_*`` columns and
``without_retrieval`` in ``metrics/eval.json``), all scored by the same metric pack, intervals and slices.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd

from loraops.core.config import Params
from loraops.core.paths import ADAPTER_DIR, EVAL_METRICS, EVAL_REPORT, EVAL_TABLE, PLOTS_DIR, prompts_folder
from loraops.core.readers import load_split
from loraops.core.results import EvalSummary, write_result
from loraops.core.utils import atomic_write, pick_device, say
from loraops.judge import tone
from loraops.judge.degenerate import clean
from loraops.judge.metrics import MetricPack
from loraops.judge.report import flat_metrics, markdown, plots, summarize
from loraops.judge.tone import SpeechLevel
from loraops.judge.validity import measure_cached, require_valid
from loraops.modeling.generation import generate, load_tuned
from loraops.modeling.prompting import PromptFormat


def score_table(rows: list[dict], base_answers: list[str], tuned_answers: list[str], pack: MetricPack,
                prompts: list[str] | None = None) -> pd.DataFrame:
    """The per-question table: question, the prompt the models read (when given), reference, both answers as a
    reader sees them, degenerate flags, scores.

    Answers are judged as generated (undecodable bytes included, so they count against the model);
    the table keeps them cleaned of U+FFFD, with the number of dropped characters.
    """
    references = [r["answer"] for r in rows]
    table = pd.DataFrame({
        "id": [r["id"] for r in rows], "group": [r["group"] for r in rows], "category": [r["category"] for r in rows],
        "question": [r["question"] for r in rows], **({"prompt": prompts} if prompts is not None else {}),
        "reference": references,
    })
    for prefix, answers in (("base", base_answers), ("tuned", tuned_answers)):
        cleaned = [clean(a) for a in answers]
        table[f"{prefix}_answer"] = [text for text, _ in cleaned]
        table[f"{prefix}_dropped_chars"] = [dropped for _, dropped in cleaned]
        scores, reasons = pack.judge(answers, references)
        table[f"{prefix}_degenerate"] = [reason is not None for reason in reasons]
        table[f"{prefix}_degenerate_reason"] = [reason or "" for reason in reasons]
        for column, values in scores.items():
            table[f"{prefix}_{column}"] = values
    return table


def select_rows(rows: list[dict], max_samples: int | None, seed: int = 0) -> list[dict]:
    """A seeded sample of whole source groups, stratified by category, of about ``max_samples`` test rows.

    Every category gets a share of the sample proportional to its size and at least one group, so a
    small sample still scores every category; paraphrases of one source row stay together.
    """
    rows = sorted(rows, key=lambda r: r["id"])
    if not max_samples or max_samples >= len(rows):
        return rows
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row["group"]), []).append(row)
    by_category: dict[str, list[list[dict]]] = {}
    for members in groups.values():
        by_category.setdefault(str(members[0]["category"]), []).append(members)
    rng = random.Random(seed)
    picked: list[dict] = []
    for category, quota in _quotas({c: sum(map(len, g)) for c, g in by_category.items()}, max_samples).items():
        taken = 0
        for members in rng.sample(by_category[category], len(by_category[category])):
            if taken >= quota:
                break
            picked += members
            taken += len(members)
    return sorted(picked, key=lambda r: r["id"])


def _quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Rows per category: proportional (largest remainder), at least 1 each."""
    whole = sum(sizes.values())
    exact = {c: total * n / whole for c, n in sorted(sizes.items())}
    quotas = {c: max(1, int(v)) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - int(exact[c]), reverse=True)[: max(0, total - sum(quotas.values()))]:
        quotas[c] += 1
    return quotas


WITHOUT_RETRIEVAL = "without_retrieval"
MIN_TONE_PROBE_ACCURACY = 0.9


def tone_expected(rows: list[dict], params: Params) -> list[str] | None:
    """The speech level each row's answer must use (``eval.tone``), or None when tone is not scored."""
    if params.eval.tone is None:
        return None
    return tone.expected_levels(rows, params.eval.tone, f"{params.data.path} (eval.tone.levels)")


def add_tone(table: pd.DataFrame, expected: list[str], classifier: SpeechLevel) -> None:
    """``<model>_tone`` (1 when the answer's speech level is the expected one; degenerate answers score 0, as for
    every metric) and ``<model>_tone_level`` (the level read) for base and tuned, and ``tone_expected``."""
    table["tone_expected"] = expected
    for model in ("base", "tuned"):
        scores, levels = tone.scores(classifier, list(table[f"{model}_answer"]), expected)
        table[f"{model}_tone"] = [0.0 if flagged else score for score, flagged in zip(scores, table[f"{model}_degenerate"])]
        table[f"{model}_tone_level"] = levels


def add_judge(table: pd.DataFrame, judge: Any, arm: str) -> dict[str, Any]:
    """``<model>_judge_<criterion>`` (1–5) and ``<model>_judge_reasons`` for base and tuned, from the LLM judge
    (``eval.judge``); with ``pairwise``, ``<model>_judge_pairwise`` (tuned over base: 1 win, 0.5 tie, 0 loss).

    A degenerate answer is not sent: it scores 1 on every criterion, as it scores 0 on every other metric. A reply
    that does not parse leaves the answer's judge scores empty (left out of the comparison); more of those than
    ``eval.judge.max_unparsed`` stops the stage. Returns what the judge cost and, pairwise, its position bias."""
    from loraops.judge.llm import Verdict, require_parsed

    cfg = judge.cfg
    verdicts: list[Verdict] = []
    for model in ("base", "tuned"):
        flagged = list(table[f"{model}_degenerate"].astype(bool))
        asked = [(q, r, a) for q, r, a, f in zip(table["question"], table["reference"], table[f"{model}_answer"], flagged)
                 if not f]
        say(f"judge: scoring {len(asked)} {model} answers{arm} with {cfg.model} ({len(flagged) - len(asked)} degenerate "
            "answers score 1 without asking)")
        answered = iter(judge.score(asked))
        mine = [None if f else next(answered) for f in flagged]
        verdicts += [v for v in mine if v is not None]
        for criterion in cfg.criteria:
            table[f"{model}_judge_{criterion}"] = [
                1.0 if v is None else (float(v.scores[criterion]) if v.scores else float("nan")) for v in mine]
        table[f"{model}_judge_reasons"] = [
            "degenerate answer" if v is None else ("(unparsed reply)" if not v.scores else
                                                   " | ".join(f"{c}: {v.reasons.get(c, '')}" for c in cfg.criteria))
            for v in mine]
    require_parsed(verdicts, cfg, f"the{arm or ''} evaluation answers")
    out: dict[str, Any] = {"unparsed": sum(v.scores is None for v in verdicts), "judged": len(verdicts)}
    if cfg.pairwise:
        flagged = table["base_degenerate"].astype(bool) | table["tuned_degenerate"].astype(bool)
        pairs = [(q, r, b, t) for q, r, b, t, f in zip(table["question"], table["reference"], table["base_answer"],
                                                        table["tuned_answer"], flagged) if not f]
        answered = iter(judge.prefer(pairs))
        results = []
        for base_bad, tuned_bad in zip(table["base_degenerate"].astype(bool), table["tuned_degenerate"].astype(bool)):
            if base_bad or tuned_bad:  # a degenerate answer loses to a real one; two degenerate ones tie
                results.append({"score": 0.5 if base_bad and tuned_bad else (1.0 if base_bad else 0.0), "consistent": None})
            else:
                results.append(next(answered))
        table["tuned_judge_pairwise"] = [float("nan") if r["score"] is None else r["score"] for r in results]
        table["base_judge_pairwise"] = 1.0 - table["tuned_judge_pairwise"]
        asked_both = [r for r in results if r.get("consistent") is not None]
        out["pairwise"] = {"pairs": len(asked_both), "position_bias_rate": round(
            sum(not r["consistent"] for r in asked_both) / len(asked_both), 4) if asked_both else None,
            "unparsed": sum(r["score"] is None for r in results)}
    return out


def require_tone_valid(classifier: SpeechLevel) -> dict[str, Any]:
    """The speech-level reader's accuracy on the graded probe lines; refuse to score tone when any level is read
    right less often than the minimum.

    Raises:
        ConfigError: accuracy under ``MIN_TONE_PROBE_ACCURACY`` (with the lines it read wrong).
    """
    from loraops.core.errors import ConfigError

    result = tone.probe(classifier)
    level, accuracy = min(result["per_level"].items(), key=lambda item: item[1])
    if accuracy < MIN_TONE_PROBE_ACCURACY:
        wrong = "; ".join(f"{w['text']!r} read {w['read']}, is {w['level']}" for w in result["wrong"][:5])
        raise ConfigError(f"eval.tone: the speech-level reader is right on {accuracy:.0%} of the {level} probe lines "
                          f"(minimum {MIN_TONE_PROBE_ACCURACY:.0%} per level): {wrong}")
    return {k: v for k, v in result.items() if k != "wrong"} | {"wrong": result["wrong"][:10]}


def arms(with_retrieval: EvalSummary, without: EvalSummary, table: pd.DataFrame, columns: list[str],
         samples: int, seed: int) -> dict[str, Any]:
    """The four arms' means per metric, and what retrieval adds to each model (paired, with its interval)."""
    from loraops.judge.report import compare

    out: dict[str, Any] = {"means": {}, "retrieval_gain": {}}
    for metric in columns:
        out["means"][metric] = {"base": without.metrics[metric].base, "tuned": without.metrics[metric].tuned,
                                "base+retrieval": with_retrieval.metrics[metric].base,
                                "tuned+retrieval": with_retrieval.metrics[metric].tuned}
        out["retrieval_gain"][metric] = {
            model: compare(table[f"{model}_{WITHOUT_RETRIEVAL}_{metric}"], table[f"{model}_{metric}"], samples,
                           seed).model_dump(mode="json", include={"delta", "ci95", "wins", "ties", "losses"})
            for model in ("base", "tuned")}
    return out


def retrieval_quality(rows: list[dict], gold_column: str | None, k: int) -> dict[str, Any]:
    """hit@k and MRR@k of the retrieved documents against each question's gold document id(s) (``rag.gold_column``,
    ``|``-separated); rows without a gold id are left out."""
    from loraops.retrieval.index import doc_of

    hits, ranks = [], []
    for row in rows:
        gold = {g.strip() for g in str(row.get("attributes", {}).get(gold_column or "", "")).split("|") if g.strip()}
        if not gold:
            continue
        docs = [doc_of(i) for i in row.get("retrieved", [])]
        rank = next((n for n, doc in enumerate(docs, start=1) if doc in gold), None)
        hits.append(rank is not None)
        ranks.append(1.0 / rank if rank else 0.0)
    out: dict[str, Any] = {"k": k, "n_with_gold": len(hits)}
    if hits:
        out.update({"hit@k": round(sum(hits) / len(hits), 6), "mrr": round(sum(ranks) / len(ranks), 6)})
    return out


def degenerate_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Per model: how many answers were flagged degenerate, their share, and how often each reason came up."""
    out = {}
    for model in ("base", "tuned"):
        reasons = table[f"{model}_degenerate_reason"][table[f"{model}_degenerate"]]
        kinds = reasons.str.split(":").str[0].value_counts().sort_index()
        out[model] = {"count": int(len(reasons)), "rate": round(len(reasons) / max(len(table), 1), 6),
                      "reasons": {str(k): int(v) for k, v in kinds.items()}}
    return out


def run(params: Params, root: Path = Path("."), self_test: bool | None = None) -> EvalSummary:
    """Generate, score and write ``metrics/eval.json``, ``reports/eval.md``, the table and the plots."""
    device = pick_device(params.base.device)
    pack = MetricPack(params.eval, device=device)
    validity = None
    if params.eval.self_test if self_test is None else self_test:
        validity, kept = measure_cached(params.eval, device, pack)
        say("metric validity on the Korean probes (eval.self_test): " +
            ("measured before with these settings and code (cache)" if kept else "measured"))
        require_valid(validity, params.registry.gate.metric, params.eval)
    classifier: SpeechLevel | None = None
    probed = None
    if params.eval.tone is not None:
        classifier = SpeechLevel(params.eval.morph_analyzer)
        if params.eval.self_test if self_test is None else self_test:
            probed = require_tone_valid(classifier)
    test_rows = load_split("test", root, prompts_folder("test", params.rag.enabled))
    rows = select_rows(test_rows, params.eval.max_samples, params.base.seed)
    expected = tone_expected(rows, params)  # a row without a mapped level fails here, before any generation
    model, tokenizer = load_tuned(params, root / ADAPTER_DIR, device, root)
    room = answer_room(tokenizer, [r["answer"] for r in rows], params.eval.max_new_tokens)
    if room["warning"]:
        say(f"warning: {room['warning']}")
    rag = params.rag.enabled
    fmt = PromptFormat.read(root / ADAPTER_DIR)
    if fmt.chat:
        say(f"prompt format: {fmt.describe}")
    answers = _answers(model, tokenizer, [r["prompt"] for r in rows], params, device, " with retrieval" if rag else "", fmt)
    say(f"scoring {len(rows)} base and tuned answers with {', '.join(params.eval.metrics)}")
    tables = [score_table(rows, *answers, pack, [fmt.shown(tokenizer, r["prompt"]) for r in rows])]
    if rag:
        tables.append(score_table(rows, *_answers(model, tokenizer, [r["prompt_plain"] for r in rows], params, device,
                                                  " without retrieval", fmt), pack,
                                  [fmt.shown(tokenizer, r["prompt_plain"]) for r in rows]))
    for frame in tables:
        for column in params.data.attribute_columns:
            frame[column] = [r.get("attributes", {}).get(column, "") for r in rows]
        if expected is not None and classifier is not None:
            add_tone(frame, expected, classifier)
    judged: dict[str, Any] = {}
    if params.eval.judge.enabled:
        from loraops.judge.llm import Judge, describe, fingerprint

        judge = Judge(params.eval.judge)
        for frame, arm in zip(tables, ("", " without retrieval")):
            judged[arm.strip() or "configured"] = add_judge(frame, judge, arm)
        judged = {"model": params.eval.judge.model, "base_url": params.eval.judge.base_url,
                  "fingerprint": fingerprint(params.eval.judge), "usage": judge.usage.to_dict(), "arms": judged}
        say(f"judge {describe(params.eval.judge)}: {judge.usage.requests} requests, {judge.usage.cached} from the "
            f"cache, {judge.usage.prompt_tokens} prompt + {judge.usage.completion_tokens} completion tokens")
    table, plain = tables[0], tables[-1]
    if rag:
        for model_name in ("base", "tuned"):
            for column in [c for c in plain.columns if c.startswith(f"{model_name}_")]:
                table[f"{model_name}_{WITHOUT_RETRIEVAL}_{column.removeprefix(model_name + '_')}"] = plain[column]
        table["sources"] = [" ".join(r["sources"]) for r in rows]
    columns = (pack.columns + (["tone"] if expected is not None else [])
               + (params.eval.judge.metric_names() if params.eval.judge.enabled else []))
    slice_columns = ["category"] + [c for c in params.data.attribute_columns if c in table and c != params.rag.gold_column]
    core = summarize(table, columns, slice_columns, params.eval.bootstrap_samples, params.base.seed,
                     params.eval.min_slice_size)
    extra: dict[str, Any] = {
        "degenerate": degenerate_summary(table),
        "answer_room": {k: v for k, v in room.items() if k != "warning"},
        "sample": {"n": len(rows), "of": len(test_rows), "seed": params.base.seed,
                   "stratified_by": "category, whole source groups" if len(rows) < len(test_rows) else None}}
    if rag:
        without = summarize(plain, columns, slice_columns, params.eval.bootstrap_samples, params.base.seed,
                            params.eval.min_slice_size).extended(degenerate=degenerate_summary(plain))
        extra["retrieval"] = {"configuration": "tuned+retrieval", "mode": params.rag.mode, "corpus": params.rag.corpus,
                              **retrieval_quality(rows, params.rag.gold_column, params.rag.k),
                              "mean_context_chars": round(sum(len(r["context"]) for r in rows) / max(1, len(rows)), 1)}
        extra["arms"] = arms(core, without, table, columns, params.eval.bootstrap_samples, params.base.seed)
        extra[WITHOUT_RETRIEVAL] = without
    if validity is not None:
        extra["validity"] = {r["metric"]: r for r in validity.table.to_dict("records")}
    if probed is not None:
        extra["tone_probe"] = probed
    if judged:
        extra["judge"] = judged
    summary = core.extended(**extra)
    primary = params.registry.gate.metric if params.registry.gate.metric in columns else pack.columns[0]
    (root / EVAL_TABLE).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(root / EVAL_TABLE, table.to_csv(index=False))
    plots(summary, table, primary, root / PLOTS_DIR)
    atomic_write(root / EVAL_REPORT, markdown(summary, table, primary))
    write_result(summary, root / EVAL_METRICS)
    return summary


def answer_room(tokenizer: Any, references: list[str], max_new_tokens: int) -> dict[str, Any]:
    """How long the reference answers are in the base's tokens against ``eval.max_new_tokens``, with a warning when
    the answers it lets the model write are much shorter (a cut answer cannot reach what the reference says)."""
    import numpy as np

    lengths = np.array([len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references] or [0])
    median, p90 = float(np.median(lengths)), float(np.percentile(lengths, 90))
    over = float((lengths > max_new_tokens).mean())
    out: dict[str, Any] = {"reference_tokens_median": median, "reference_tokens_p90": p90, "max_new_tokens": max_new_tokens,
                           "references_longer": round(over, 4), "warning": None}
    if over > 0.25:
        out["warning"] = (f"{over:.0%} of the reference answers are longer than eval.max_new_tokens={max_new_tokens} "
                          f"tokens (median {median:.0f}, p90 {p90:.0f}): the model's answers are cut there and score "
                          f"lower than they would; raise eval.max_new_tokens to about {int(p90)}")
    return out


def _answers(model: Any, tokenizer: Any, prompts: list[str], params: Params, device: str,
             arm: str, fmt: PromptFormat) -> tuple[list[str], list[str]]:
    """Base and tuned answers to ``prompts`` from one PeftModel (the base with its adapter disabled), both in the
    prompt format the adapter was trained with (an instruct base is asked through its own chat template)."""
    tuned = generate(model, tokenizer, prompts, params.eval, device, label=f"tuned answers{arm}", fmt=fmt)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, params.eval, device, label=f"base answers{arm}", fmt=fmt)
    return base, tuned


def read_table(root: Path = Path(".")) -> pd.DataFrame:
    """The per-question table of the last evaluate."""
    return pd.read_csv(root / EVAL_TABLE, keep_default_na=False)


__all__ = ["run", "score_table", "flat_metrics", "read_table"]
