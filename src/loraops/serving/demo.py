"""`loraops demo`: ask once, read base / production / candidate side by side, rate them, keep corrections.

The answers come from the same engine as ``loraops serve`` (one base, the adapters beside it), so they are
the API's and the pyfunc model's answers. Ratings — thumbs and the 1–5 relevance / accuracy / completeness
rubric of ``loraops review`` — go to the MLflow run of the version they rate (``review/items.json`` and the
``review/…`` metrics the gate reads; a base answer counts as ``base`` in the run of each version shown
beside it). An approved corrected answer is appended to ``data/feedback/corrections.jsonl`` (``qa`` columns:
question, answer, category) and the file is tracked with ``dvc add``, ready to be added to the next data
version.

With ``eval.judge.enabled`` the LLM judge scores the shown answers once the rater has saved (never before, so it
cannot anchor the rater): its scores and reasons appear under each answer, each rating keeps them beside the
rater's, and a difference of 2 or more is listed for review (and counts in `loraops judge calibrate`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loraops.core.errors import ConfigError, LoraopsError
from loraops.core.paths import FEEDBACK
from loraops.core.utils import jsonl_line, jsonl_lines
from loraops.judge.degenerate import detect
from loraops.review.rubric import CRITERIA
from loraops.serving.api import Settings
from loraops.serving.catalog import Catalog, Version
from loraops.serving.engine import Engine

ARMS = ("base", "production", "candidate")
THUMBS = ("👍 good", "👎 bad")
_feedback_lock = threading.Lock()
_ratings_lock = threading.Lock()  # review.record reads, merges and rewrites a run's items: one save at a time
_judge_lock = threading.Lock()


VERDICT_NOTES = {
    "refused": " · ✗ refused by the gate (not promotable as it is)",
    "rejected by reviewer": " · ✗ rejected by a reviewer",
    "forced": " · ⚠ promoted by force: the gate was overridden",
}
"""What an arm's label adds for the gate verdict its version carries (the `gate.verdict` tag); promoted and
not-yet-gated versions add nothing."""


def verdict_note(verdict: str | None) -> str:
    return VERDICT_NOTES.get(verdict or "", "")


LIMITS = {"question": 2000, "field": 200, "rater": 80, "correction": 4000}
"""Longest text (characters) the page takes per input: the question, each template field, the rater's name, a
corrected answer."""


def check_text(values: dict[str, str], limits: dict[str, int]) -> list[str]:
    """Every problem with the page's inputs at once: text over its limit, or not Unicode text (a lone surrogate,
    which JSON can carry and no tokenizer encodes)."""
    problems = []
    for key, value in values.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            problems.append(f"{key}: not valid Unicode text (a lone surrogate at character {exc.start})")
            continue
        limit = limits.get(key, limits["field"])
        if len(value) > limit:
            problems.append(f"{key}: {len(value)} characters; at most {limit}")
    return problems


def demo_users(environ: dict[str, str]) -> list[tuple[str, str]] | None:
    """The accounts that may use the page: ``LORAOPS_DEMO_USERS`` (``name:password,…``); None when unset.

    Raises:
        ConfigError: an entry without a name or a password.
    """
    raw = environ.get("LORAOPS_DEMO_USERS", "").strip()
    if not raw:
        return None
    users = []
    for entry in (e.strip() for e in raw.split(",") if e.strip()):
        name, _, password = entry.partition(":")
        if not name.strip() or not password:
            raise ConfigError("LORAOPS_DEMO_USERS: each entry is name:password, separated by commas")
        users.append((name.strip(), password))
    return users


class Demo:
    """What the page calls: answers for the three arms, and saving ratings and corrections.

    With ``signed_in`` the rater is the signed-in account (the page has no name box to type another's)."""

    def __init__(self, catalog: Catalog, engine: Engine, settings: Settings, name: str, fields: list[str],
                 signed_in: bool = False, judge: Any = None) -> None:
        self.catalog, self.engine, self.settings, self.name, self.fields = catalog, engine, settings, name, fields
        self.signed_in = signed_in
        self.judge = judge  # loraops.judge.llm.Judge with eval.judge.enabled, else None

    def judge_answers(self, question: str, shown: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The LLM judge's scores and reasons for each arm's answer (asked only once a rater has saved, so raters are
        never anchored by it); an arm whose reply did not parse, or a judge that cannot be reached, says so."""
        from loraops.judge.llm import JudgeError

        if self.judge is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for arm in ARMS:  # as evaluate does: a degenerate answer scores 1 and is not sent
            if (shown.get(arm) or {}).get("degenerate"):
                why = f"degenerate answer ({shown[arm]['degenerate']}): 1 without asking the judge, as the gate scores it"
                out[arm] = {"scores": {c: 1 for c in self.judge.cfg.criteria}, "reasons": dict.fromkeys(self.judge.cfg.criteria, why)}
        arms = [arm for arm in ARMS if (shown.get(arm) or {}).get("answer") and arm not in out]
        if not arms:
            return out
        try:
            verdicts = self.judge.score([(question, None, shown[arm]["answer"]) for arm in arms])
        except JudgeError as exc:
            return out | {arm: {"error": str(exc)} for arm in arms}
        for arm, verdict in zip(arms, verdicts):
            out[arm] = ({"scores": verdict.scores, "reasons": verdict.reasons} if verdict.scores else
                        {"error": "the judge's reply could not be parsed: " + " ".join(verdict.reply.split())[:200]})
        return out

    def versions(self) -> dict[str, Version | None]:
        """The arm → version shown now (aliases are read at every question)."""
        shown: dict[str, Version | None] = {"base": None}
        for alias in ("production", "candidate"):
            try:
                shown[alias] = self.catalog.resolve(f"{self.name}@{alias}")
            except LoraopsError:
                shown[alias] = None
        return shown

    def verdict_of(self, version: Version | None) -> str | None:
        """The gate's verdict on ``version`` (read at every question: a promotion or refusal shows at once)."""
        if version is None:
            return None
        try:
            return self.catalog.client.get_model_version(version.name, version.number).tags.get("gate.verdict")
        except Exception:  # noqa: BLE001 - the label is best effort; the answer is shown either way
            return None

    def ask(self, question: str, fields: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Each arm's label, version and answer (arms without a version say so)."""
        if not question.strip():
            raise ConfigError("question: type a question first")
        problems = check_text({"question": question, **fields}, LIMITS)
        if problems:
            raise ConfigError("; ".join(problems))
        out: dict[str, dict[str, Any]] = {}
        for arm, version in self.versions().items():
            if arm != "base" and version is None:
                out[arm] = {"label": f"{arm}: no version has this alias yet", "version": None, "answer": ""}
                continue
            if not self.engine.serves(version):  # e.g. a candidate on a new base: the other arms still answer
                assert version is not None
                out[arm] = {"label": f"{arm} · {version.name}/{version.number} was trained on another base "
                                     f"({version.spec['base'].get('configured')}) than this demo holds "
                                     f"({self.engine.model_cfg.base}): run `loraops demo` where that base is served, "
                                     f"or ask it with `loraops ask --model models:/{version.name}/{version.number}`",
                            "version": None, "answer": ""}
                continue
            generation = self.settings.generation(version)
            context, sources = self.catalog.passages(version, question)
            prompt = self.settings.prompt(version, question, {**fields, **({"context": context} if sources else {})})
            tokens = self.engine.count_tokens(self.engine.format_of(version).text(self.engine.tokenizer, prompt))
            if tokens > self.settings.max_prompt_tokens:
                raise ConfigError(f"question: the prompt has {tokens} tokens; at most {self.settings.max_prompt_tokens}")
            answer, raw = self.engine.answer(prompt, version, int(generation["max_new_tokens"]),
                                             list(generation.get("stop_strings", [])))
            label = f"{arm} · {version.name}/{version.number}" if version else "base model (no adapter)"
            label += verdict_note(self.verdict_of(version))
            if version is not None and version.warning:
                label += " · ⚠ below the gate's quality floors: its answers may be broken"
            if sources:
                label += f" · with retrieval, sources: {', '.join(r['id'] for r in sources)}"
            if arm == "candidate" and version and out.get("production", {}).get("version") == f"{version.name}/{version.number}":
                label += " (the production version)"
            flagged = detect(raw)  # judged as generated, as the gate judges it
            if flagged:
                label += f" · ⚠ degenerate answer ({flagged}): the gate scores it 0"
            out[arm] = {"label": label, "version": f"{version.name}/{version.number}" if version else None, "answer": answer,
                        "degenerate": flagged}
        return out

    def save(self, rater: str, question: str, fields: dict[str, str], shown: dict[str, dict[str, Any]],
             ratings: dict[str, dict[str, Any]], judged: dict[str, dict[str, Any]] | None = None) -> str:
        """Record the arms' ratings in their runs and approved corrections in the feedback file; say what was saved.

        With a judge, once the input is valid the judge scores the shown answers (into ``judged``, when given); each
        rating keeps the judge's scores beside the rater's, and the note lists where they differ by 2 or more.

        Raises:
            ConfigError: no rater, nothing asked yet, or a rubric only partly filled (naming arm and criterion).
        """
        from loraops.registry.versions import mlflow_client
        from loraops.review import rubric as review

        if not rater.strip():
            raise ConfigError("your name: ratings are recorded with the rater's name")
        if not shown:
            raise ConfigError("ask a question first")
        problems = check_text({"rater": rater, **{f"{arm} correction": str(given.get("correction") or "")
                                                   for arm, given in ratings.items()}},
                              {**LIMITS, **{f"{arm} correction": LIMITS["correction"] for arm in ratings}})
        if problems:
            raise ConfigError("; ".join(problems))
        rated = {}
        for arm, given in ratings.items():
            scores = {c: given.get(c) for c in CRITERIA}
            filled = [c for c, v in scores.items() if v]
            if filled and len(filled) < len(CRITERIA):
                missing = ", ".join(c for c in CRITERIA if c not in filled)
                raise ConfigError(f"{arm}: {missing} not rated (rate all three criteria, or none)")
            if filled or given.get("thumb"):
                rated[arm] = {"thumb": {THUMBS[0]: "up", THUMBS[1]: "down"}.get(given.get("thumb") or ""),
                              **{c: int(v) if v else None for c, v in scores.items()}}
        corrections = [(arm, (given.get("correction") or "").strip()) for arm, given in ratings.items()
                       if given.get("approve") and (given.get("correction") or "").strip()]
        if not rated and not corrections:
            raise ConfigError("nothing rated: give a thumb or the three scores to at least one answer "
                              "(or approve a corrected answer)")
        with _judge_lock:  # rapid saves of one answer: the first asks, the others read its cached reply
            verdicts = self.judge_answers(question, shown)
        if judged is not None:
            judged.update(verdicts)
        runs: dict[str, str] = {}
        client = mlflow_client()
        for arm in ("production", "candidate"):
            number = shown.get(arm, {}).get("version")
            if number:
                name, version = number.split("/")
                run_id = client.get_model_version(name, version).run_id
                if run_id:  # a version registered from outside a run has no run to hold its ratings
                    runs[arm] = run_id
        when, saved = time.strftime("%Y-%m-%dT%H:%M:%S%z"), []
        for arm, item in rated.items():
            targets = [runs[arm]] if arm in runs else ([] if arm != "base" else list(dict.fromkeys(runs.values())))
            if arm != "base" and arm not in runs:
                continue
            for run_id in targets:
                key = review.rating_key("demo", rater, shown[arm].get("version") or "base", question)
                entry = {**item, "key": key, "source": "demo", "model": "base" if arm == "base" else "tuned",
                         "rater": rater, "question": question, "answer": shown[arm]["answer"], "created": when,
                         "degenerate": shown[arm].get("degenerate")}
                if verdicts.get(arm, {}).get("scores"):
                    from loraops.judge.llm import fingerprint

                    entry["judge"] = {**verdicts[arm], "fingerprint": fingerprint(self.judge.cfg),
                                      "model": self.judge.cfg.model}
                with _ratings_lock:
                    review.record(run_id, [entry])
                    _trace(run_id, key, entry, arm)
                saved.append(f"{arm} → run {run_id[:8]}")
        added = 0
        for arm, text in corrections:
            added += append_feedback({"question": question, "answer": text, "category": fields.get("category", ""),
                             "source": "demo", "corrects": shown.get(arm, {}).get("version") or "base",
                             "rater": rater, "created": when})
        note = f"saved ratings: {', '.join(saved)}" if saved else "no ratings recorded (no version to record them against)"
        differ = disagreements(rated, verdicts)
        if differ:
            note += "; judge and rater differ by 2 or more (listed for review): " + ", ".join(differ)
        if corrections:
            note += (f"; appended {added} approved correction(s) to {FEEDBACK}" if added else
                     f"; the approved correction(s) were already in {FEEDBACK}")
        return note


def _trace(run_id: str, key: str, entry: dict[str, Any], arm: str) -> None:
    """The rating as an MLflow trace with human and LLM-judge assessments (best effort: the rating itself is saved)."""
    import logging

    from loraops.registry.tracking import log_rating_trace

    scores = {c: entry.get(c) for c in CRITERIA}
    if entry.get("thumb"):
        scores["thumbs_up"] = entry["thumb"] == "up"
    try:
        log_rating_trace(run_id, key, entry["question"], entry["answer"],
                         {"loraops.arm": arm, "loraops.model": entry["model"]}, entry["rater"], scores, entry.get("judge"))
    except Exception as exc:  # noqa: BLE001 - a trace store that refuses must not lose the rating already recorded
        logging.getLogger(__name__).warning("rating saved; its MLflow trace was not: %s", exc)


def disagreements(rated: dict[str, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> list[str]:
    """``arm criterion (rater N, judge M)`` wherever the judge and the rater differ by 2 points or more."""
    out = []
    for arm, item in rated.items():
        scores = verdicts.get(arm, {}).get("scores") or {}
        for criterion in CRITERIA:
            if item.get(criterion) and criterion in scores and abs(scores[criterion] - item[criterion]) >= 2:
                out.append(f"{arm} {criterion} (rater {item[criterion]}, judge {scores[criterion]})")
    return out


def judge_markdown(verdict: dict[str, Any] | None) -> str:
    """What the page shows under an answer once saved: the judge's score and reason per criterion."""
    if not verdict:
        return ""
    if "error" in verdict:
        return f"**LLM judge:** {verdict['error']}"
    lines = ["**LLM judge** (after your rating):"]
    lines += [f"- {criterion}: **{score}** — {verdict['reasons'].get(criterion, '')}"
              for criterion, score in verdict["scores"].items()]
    return "\n".join(lines)


def append_feedback(row: dict[str, Any], path: Path = FEEDBACK) -> bool:
    """Append one corrected answer and keep the file tracked by DVC (``dvc add``) when the project uses DVC; False
    (nothing written) when the same rater already gave this correction to this question for this version."""
    same = ("question", "answer", "corrects", "rater")
    with _feedback_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in jsonl_lines(path.read_text(encoding="utf-8")):
                if line.strip() and all(json.loads(line).get(k) == row.get(k) for k in same):
                    return False
        with path.open("a", encoding="utf-8") as fh:
            fh.write(jsonl_line(row))
        if Path(".dvc").is_dir():
            dvc = Path(sys.executable).with_name("dvc")
            subprocess.run([str(dvc) if dvc.exists() else "dvc", "add", "-q", str(path)], check=False,
                           capture_output=True, text=True)
    return True


def build_ui(demo: Demo) -> Any:
    """The Gradio page: question (and template fields), three answer columns with ratings, one save button."""
    import gradio as gr

    with gr.Blocks(title=f"loraops demo · {demo.name}") as page:
        gr.Markdown(f"## {demo.name}: base, production and candidate side by side\n"
                    "Ask, read the three answers, rate what you read (thumbs, or all three 1–5 scores), and save. "
                    "Ratings go to the version's MLflow run, where the promotion gate reads them; an approved "
                    f"correction is added to `{FEEDBACK}` for the next data version.")
        with gr.Row():
            question = gr.Textbox(label="Question", lines=2, scale=4, elem_id="question")
            field_boxes = [gr.Textbox(label=f, scale=1, elem_id=f"field-{f}") for f in demo.fields]
        ask = gr.Button("Ask", variant="primary", elem_id="ask")
        columns: dict[str, dict[str, Any]] = {}
        with gr.Row(equal_height=True):
            for arm in ARMS:
                with gr.Column():
                    c = columns[arm] = {}
                    c["label"] = gr.Markdown(f"**{arm}**", elem_id=f"{arm}-label")
                    c["answer"] = gr.Textbox(label="Answer", lines=5, interactive=False, elem_id=f"{arm}-answer")
                    c["thumb"] = gr.Radio(list(THUMBS), label="Thumbs", elem_id=f"{arm}-thumb")
                    for criterion in CRITERIA:
                        c[criterion] = gr.Radio(["1", "2", "3", "4", "5"], label=f"{criterion.capitalize()} (1–5)",
                                                elem_id=f"{arm}-{criterion}")
                    c["correction"] = gr.Textbox(label="Corrected answer (optional)", lines=3, elem_id=f"{arm}-correction")
                    c["approve"] = gr.Checkbox(label="Approve this correction for the training data",
                                               elem_id=f"{arm}-approve")
                    c["judge"] = gr.Markdown(elem_id=f"{arm}-judge")  # filled only after a save
        with gr.Row():
            rater = gr.Textbox(label="Your name", scale=1, elem_id="rater", max_length=LIMITS["rater"],
                               visible=not demo.signed_in)  # signed in: the account is the rater
            save = gr.Button("Save ratings", scale=1, elem_id="save")
        status = gr.Markdown(elem_id="status")
        shown = gr.State({})
        asked = gr.State({})

        rating_keys = ["thumb", *CRITERIA, "correction", "approve"]
        rating_inputs = [columns[arm][key] for arm in ARMS for key in rating_keys]

        def on_ask(q: str, *values: str) -> list[Any]:
            fields = dict(zip(demo.fields, values))
            try:
                result = demo.ask(q, fields)
            except LoraopsError as exc:
                raise gr.Error(str(exc)) from None
            out: list[Any] = [result, {"question": q, "fields": fields}]
            for arm in ARMS:
                out += [f"**{result[arm]['label']}**", result[arm]["answer"]]
            out += [None] * len(rating_inputs) + [""] + [""] * len(ARMS)
            return out

        judge_outputs = [columns[arm]["judge"] for arm in ARMS]
        ask_outputs = ([shown, asked] + [columns[arm][k] for arm in ARMS for k in ("label", "answer")] + rating_inputs
                       + [status] + judge_outputs)
        ask.click(on_ask, [question, *field_boxes], ask_outputs)
        question.submit(on_ask, [question, *field_boxes], ask_outputs)

        def on_save(request: gr.Request, name: str, result: dict, context: dict, *values: Any) -> list[str]:
            per_arm = {arm: dict(zip(rating_keys, values[i * len(rating_keys):(i + 1) * len(rating_keys)]))
                       for i, arm in enumerate(ARMS)}
            if demo.signed_in:
                name = getattr(request, "username", None) or ""
                if not name:
                    raise gr.Error("sign in first: ratings are recorded under your account")
            judged: dict[str, dict[str, Any]] = {}
            try:
                note = demo.save(name, context.get("question", ""), context.get("fields", {}), result, per_arm, judged)
            except LoraopsError as exc:
                raise gr.Error(str(exc)) from None
            return [note] + [judge_markdown(judged.get(arm)) for arm in ARMS]

        # Gradio passes the request (the signed-in user) to a parameter annotated gr.Request; with postponed
        # annotations the string "gr.Request" cannot be resolved from this module, so the class is given directly
        on_save.__annotations__["request"] = gr.Request
        save.click(on_save, [rater, shown, asked, *rating_inputs], [status, *judge_outputs])
    return page


def authentication(environ: dict[str, str]) -> Any:
    """Gradio's ``auth``: the ``LORAOPS_DEMO_USERS`` accounts, else any name with ``LORAOPS_API_KEY`` as the password
    (the name becomes the rater), else None (no sign-in: loopback use only)."""
    import hmac

    users = demo_users(environ)
    if users is not None:
        return users
    key = environ.get("LORAOPS_API_KEY")
    if key:
        return lambda user, password: bool(user.strip()) and len(user) <= LIMITS["rater"] and hmac.compare_digest(
            password.encode("utf-8", "replace"), key.encode())
    return None


def launch(params: Any, name: str, host: str, port: int) -> None:
    """Open the engine over ``name``'s versions and serve the page until interrupted."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from loraops.core.text import template_fields
    from loraops.serving import api

    auth = authentication(dict(os.environ))
    catalog, engine, settings, _ = api.open_engine(params, [name])
    fields = [f for f in dict.fromkeys(template_fields(params.prompt_template)) if f not in ("question", "context")]
    judge = None
    if params.eval.judge.enabled:
        from loraops.judge.llm import Judge

        judge = Judge(params.eval.judge)
    build_ui(Demo(catalog, engine, settings, name, fields, signed_in=auth is not None, judge=judge)).queue(
        default_concurrency_limit=8).launch(server_name=host, server_port=port, share=False, show_error=True,
                                            quiet=True, auth=auth, auth_message="Sign in to rate: your account is "
                                            "recorded with every rating the promotion gate reads.")
