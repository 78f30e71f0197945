"""Serving: the MLflow pyfunc model that carries an adapter, and `loraops ask`.

The registered model carries the adapter, a pinned reference to its base (the base files themselves
when the base is a small local directory such as the tiny base; else the hub id and revision), the
prompt template and the decoding settings. `predict` answers a list of questions or a DataFrame with a
``question`` column, greedily, exactly as evaluate generated the tuned answers.

A version trained with retrieval (``rag.enabled``) also carries its index (``data/index``) and retrieval settings:
it looks up each question's passages as evaluate did, and `predict` returns a table of ``answer`` and ``sources``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from mlflow.pyfunc.model import PythonModel

from loraops.modeling.prompting import PromptFormat

_log = logging.getLogger("loraops.serve")


class LoraQAModel(PythonModel):
    """Base + LoRA adapter answering domain questions."""

    def load_context(self, context: Any) -> None:
        from peft import PeftModel

        from loraops.core.config import EvalSection, ModelSection
        from loraops.core.utils import pick_device
        from loraops.modeling.model import load_base, load_tokenizer

        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        self.spec = spec
        self.device = pick_device("auto")
        model_cfg = ModelSection(base=spec["base"]["id"], revision=spec["base"].get("revision"),
                                 trust_remote_code=spec["base"].get("trust_remote_code", False))
        location = context.artifacts.get("base") or spec["base"]["id"]
        dtype = "bf16" if self.device == "cuda" else "fp32"
        base = load_base(location, model_cfg, self.device, dtype=dtype)
        self.tokenizer = load_tokenizer(context.artifacts["adapter"], model_cfg)
        self.fmt = PromptFormat.read(context.artifacts["adapter"])  # the prompt format it was trained with
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).to(self.device)
        self.eval_cfg = EvalSection(**spec["generation"])
        self.retriever = retriever_for(spec, context.artifacts.get("index"))
        breaches = (spec.get("quality") or {}).get("breaches")
        if breaches:  # only a forced promotion serves such a version; say so wherever it is loaded
            import warnings

            message = f"this model is below the gate's quality floors: {'; '.join(breaches)}"
            _log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)

    def _records(self, model_input: Any) -> list[dict[str, str]]:
        import pandas as pd

        if isinstance(model_input, str):
            records = [{"question": model_input}]
        elif isinstance(model_input, pd.DataFrame):
            if "question" not in model_input.columns and len(model_input.columns) != 1:
                raise ValueError(f"input DataFrame needs a 'question' column; got {list(model_input.columns)}")
            frame = model_input if "question" in model_input.columns else model_input.set_axis(["question"], axis=1)
            records = frame.astype(str).to_dict("records")
        else:
            records = [{"question": str(q)} for q in model_input]
        return records

    def passages(self, question: str) -> tuple[str, list[dict[str, Any]]]:
        """The ``{context}`` for a question and the passages it holds (``id``, ``score``, ``text``), as evaluate
        built them; empty without retrieval."""
        return passages(self.retriever, self.spec, question)

    def prompts_and_sources(self, model_input: Any) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Each input's prompt through the version's template (with its passages, for a retrieval version)."""
        prompts, sources = [], []
        for record in self._records(model_input):
            context, found = self.passages(record["question"])
            prompts.append(self.spec["template"].format_map(_Defaults({**record, "context": context})))
            sources.append(found)
        return prompts, sources

    def _prompts(self, model_input: Any) -> list[str]:
        return self.prompts_and_sources(model_input)[0]

    def answer_raw(self, model_input: Any) -> list[str]:
        """Answers exactly as generated, undecodable characters included (what the gate judges)."""
        from loraops.modeling.generation import generate

        return generate(self.model, self.tokenizer, self._prompts(model_input), self.eval_cfg, self.device, progress=False,
                        fmt=self.fmt)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> Any:
        """Answers without undecodable characters, for a list of questions or a table (see :func:`signature`);
        for a version with retrieval, a table of ``answer`` and ``sources`` (the passage ids it was given).

        ``model_input`` is typed as a DataFrame because that is the one hint from which MLflow infers no schema
        (without a hint it warns on every load); lists and strings are answered too. The schema is :func:`signature`.
        """
        from loraops.modeling.generation import generate

        prompts, sources = self.prompts_and_sources(model_input)
        answers = clean_answers(generate(self.model, self.tokenizer, prompts, self.eval_cfg, self.device, progress=False,
                                         fmt=self.fmt))
        if self.retriever is None:
            return answers
        return pd.DataFrame({"answer": answers, "sources": [[r["id"] for r in found] for found in sources]})


def retriever_for(spec: dict[str, Any], index_dir: str | None) -> Any:
    """The retriever of a version registered with retrieval (its bundled index and settings), else None."""
    if not index_dir or not spec.get("retrieval"):
        return None
    from loraops.core.config import EvalSection, Params, RagSection
    from loraops.retrieval.index import Retriever

    settings = spec["retrieval"]
    params = Params(rag=RagSection(**settings["rag"]), eval=EvalSection(**settings["morphemes"]))
    return Retriever(params, folder=Path(index_dir))


def passages(retriever: Any, spec: dict[str, Any], question: str) -> tuple[str, list[dict[str, Any]]]:
    """The ``{context}`` for a question and the passages it holds (``id``, ``score``, ``text``), as evaluate built
    them; empty without a retriever."""
    from loraops.retrieval.index import context_of

    if retriever is None:
        return "", []
    settings = spec["retrieval"]["rag"]
    results = retriever.search(question, settings["k"])
    context, ids = context_of(results, settings["max_context_chars"])
    return context, [r for r in results if r["id"] in ids]


def clean_answers(answers: list[str]) -> list[str]:
    """Answers without undecodable characters (U+FFFD); a warning says how many were dropped."""
    from loraops.judge.degenerate import clean

    cleaned = [clean(a) for a in answers]
    dropped = sum(n for _, n in cleaned)
    if dropped:
        _log.warning("dropped %d undecodable character(s) from %d answer(s)", dropped, sum(n > 0 for _, n in cleaned))
    return [text for text, _ in cleaned]


class _Defaults(dict):
    """Template fields absent from the input render as empty text (e.g. category at serving time)."""

    def __missing__(self, key: str) -> str:
        return ""


def model_files(name: str, number: str, dst: Path) -> dict[str, Any]:
    """Download a registered version into ``dst``: paths of its ``adapter``, ``base`` (when bundled) and
    ``lineage``, and its parsed ``spec``.

    Raises:
        RegistryError: the version is not a loraops adapter model.
    """
    import mlflow
    from mlflow.models import Model

    from loraops.core.errors import RegistryError

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{number}", dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    files: dict[str, Any] = {key: str(local / value["path"]) for key, value in artifacts.items()}
    if "adapter" not in files or "spec" not in files:
        raise RegistryError(f"{name}/{number} is not a loraops adapter model (no adapter and spec artifacts)")
    files["spec"] = json.loads(Path(files["spec"]).read_text(encoding="utf-8"))
    return files


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → (name, version, alias).

    Raises:
        ConfigError: anything else.
    """
    from loraops.core.errors import ConfigError

    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise ConfigError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version, None


def stream_answer(uri: str, question: str, dropped: list[int] | None = None,
                  sources: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """Yield the answer to one question piece by piece as tokens are generated, without U+FFFD.

    ``dropped``, when given, receives the number of undecodable characters left out; ``sources`` the passages
    the answer was given (a version with retrieval).
    """
    from loraops.judge.degenerate import clean

    for piece in _raw_stream(uri, question, sources if sources is not None else []):
        text, lost = clean(piece)
        if dropped is not None and lost:
            dropped.append(lost)
        if text:
            yield text


def _raw_stream(uri: str, question: str, sources: list[dict[str, Any]]) -> Iterator[str]:
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    from loraops.registry.versions import load_model

    inner = load_model(uri).unwrap_python_model()
    prompts, found = inner.prompts_and_sources([question])
    prompt = prompts[0]
    sources.extend(found[0])
    tok = inner.tokenizer
    fmt = getattr(inner, "fmt", None) or PromptFormat()
    enc = tok([fmt.text(tok, prompt)], return_tensors="pt", add_special_tokens=False).to(inner.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=inner.eval_cfg.max_new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=tok.pad_token_id, eos_token_id=fmt.eos_argument(tok, inner.model))
    with torch.inference_mode():
        thread = Thread(target=inner.model.generate, kwargs=kwargs)
        thread.start()
        text = ""
        for piece in streamer:
            stops = [s for s in inner.eval_cfg.stop_strings if s and s in text + piece]
            if stops:
                yield (text + piece)[len(text): (text + piece).index(stops[0])]
                break
            text += piece
            yield piece
        thread.join()


def answer_file(uri: str, path: Path, out: Path, column: str = "question") -> Path:
    """Answer every question of a CSV/JSONL file (its ``column``) in batches; write it back with ``answer`` added."""
    from tqdm.auto import tqdm

    from loraops.core.readers import read_question_column
    from loraops.registry.versions import load_model

    frame = read_question_column(path, column)
    model = load_model(uri)
    questions = frame[column].astype(str).tolist()
    answers: list[str] = []
    sources: list[str] = []
    size = 32
    for start in tqdm(range(0, len(questions), size), desc="answer"):
        predicted = model.predict(questions[start: start + size])
        if isinstance(predicted, pd.DataFrame):  # a version with retrieval: answers and the passages they were given
            answers.extend(predicted["answer"])
            sources.extend(" ".join(ids) for ids in predicted["sources"])
        else:
            answers.extend(predicted)
    frame["answer"] = answers  # predict() already dropped undecodable characters
    if sources:
        frame["sources"] = sources
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out
