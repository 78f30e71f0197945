"""`loraops serve`: an OpenAI-compatible API over one base model and the registered adapters, side by side.

- ``GET /v1/models`` lists ``base``, ``<name>@<alias>`` and ``<name>/<version>`` of the served registered
  models, read from the MLflow registry on every call (an alias moved by ``promote`` is served at once).
- ``POST /v1/chat/completions`` answers the last user message through the version's prompt template,
  exactly as ``loraops ask`` and the pyfunc model do (same prompt, greedy by default, same stop strings and
  end-of-turn tokens, undecodable characters dropped); template fields other than ``question`` come from
  ``metadata``. For a version trained with a chat template, the system message and earlier turns are rendered
  through that template (the trained system prompt when none is sent); a plain-template version refuses them with
  a 400 unless the server was started with ``--last-user-message-only``.
  A version registered with retrieval looks up the question's passages in its bundled index first and returns
  them as ``sources`` (an extra top-level field; in a stream, on the first chunk).
  ``POST /v1/completions`` continues a raw prompt. Both stream as server-sent events ending in ``[DONE]``.
- One base model is in memory; every requested version's adapter is loaded next to it (peft named
  adapters) and a worker thread micro-batches waiting requests, adapters mixed in one batch
  (peft's ``adapter_names``), each row stopping on its own ``max_tokens``, stop strings or end of text.
- Errors have OpenAI's shape: unknown model 404, bad body 400, ``max_tokens`` over the limit 400, a full
  queue 429, a missing or wrong key 401 when ``LORAOPS_API_KEY`` is set.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request  # module level: FastAPI resolves the endpoints' annotations here

from loraops.core.errors import LoraopsError
from loraops.modeling.prompting import PromptFormat

_log = logging.getLogger("loraops.api")
BASE = "base"
PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


DISCONNECT_POLL_S = 0.25
"""How often a waiting non-streaming request checks that its client is still there."""
MIN_TEMPERATURE = 1e-5
"""Below this a temperature cannot be sampled with (the logits overflow): such a request is answered greedily."""


class ApiError(LoraopsError):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- what is served: the registry's versions


@dataclass(frozen=True)
class Version:
    """One registered version, downloaded: its adapter, prompt template and decoding settings."""

    name: str
    number: str
    adapter_dir: str
    spec: dict[str, Any]
    base_dir: str | None  # the bundled base, when the version carries one
    index_dir: str | None = None  # the bundled retrieval index, for a version registered with rag.enabled

    @property
    def adapter_name(self) -> str:
        return f"{self.name}/v{self.number}"

    @property
    def warning(self) -> str | None:
        """Set when the version's tuned answers breach a gate floor (only a forced promotion serves one)."""
        breaches = (self.spec.get("quality") or {}).get("breaches")
        if not breaches:
            return None
        text = f"{self.name} v{self.number} is below the gate's quality floors: {'; '.join(breaches)}"
        return text.encode("ascii", "replace").decode()  # an HTTP header value


@functools.lru_cache(maxsize=64)
def version_format(adapter_dir: str) -> PromptFormat:
    """The prompt format saved with a downloaded adapter (plain for one trained before formats were recorded)."""
    return PromptFormat.read(adapter_dir)


def base_identity(spec: dict[str, Any], base_dir: str | None) -> str:
    """What must match for two versions to share one base: configured id, revision, and a bundled base's files."""
    parts = [str(spec["base"].get("configured")), str(spec["base"].get("revision"))]
    if base_dir:
        for fname in ("config.json", "loraops_base.json"):
            path = Path(base_dir) / fname
            if path.exists():
                parts.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return "|".join(parts)


class Catalog:
    """The served registered models, resolved through MLflow on each request; versions downloaded once."""

    def __init__(self, names: list[str], cache_dir: Path) -> None:
        from loraops.registry.versions import mlflow_client

        self.names, self.cache_dir = names, cache_dir
        self.client = mlflow_client()
        self._downloaded: dict[tuple[str, str], Version] = {}
        self._retrievers: dict[tuple[str, str, str], Any] = {}
        self._search_lock = threading.Lock()
        self._lock = threading.Lock()

    def entries(self) -> list[dict[str, Any]]:
        """``/v1/models`` data: base, every alias and every version of the served models."""
        from loraops.registry.versions import QUALITY_TAG, versions_of

        created = int(time.time())
        out = [{"id": BASE, "object": "model", "created": created, "owned_by": "loraops"}]
        for name in self.names:
            try:
                model = self.client.get_registered_model(name)
            except Exception:  # noqa: BLE001 - a name with no versions yet lists nothing
                continue
            for alias, number in sorted((model.aliases or {}).items()):
                out.append({"id": f"{name}@{alias}", "object": "model", "created": created, "owned_by": "loraops",
                            "parent": BASE, "root": f"{name}/{number}"})
            for mv in versions_of(self.client, name):
                out.append({"id": f"{name}/{mv.version}", "object": "model", "created": int(mv.creation_timestamp / 1000),
                            "owned_by": "loraops", "parent": BASE, "root": f"{name}/{mv.version}",
                            **({"quality_floors": mv.tags[QUALITY_TAG]} if mv.tags.get(QUALITY_TAG, "ok") != "ok" else {})})
        return out

    def resolve(self, model_id: str) -> Version | None:
        """``base`` → None; ``name@alias``, ``name/version`` or a bare ``name`` (= ``@production``) → its Version.

        Raises:
            ApiError: 404 for a model, alias or version that is not served.
        """
        from loraops.registry.versions import RegistryError, resolve

        if model_id == BASE:
            return None
        name, number, alias = model_id, None, None
        if "@" in model_id:
            name, alias = model_id.split("@", 1)
        elif "/" in model_id:
            name, number = model_id.rsplit("/", 1)
            if not number.isascii() or not number.isdigit() or number.startswith("0"):  # one id per version: name/1
                raise ApiError(404, f"The model `{_cut(model_id)}` does not exist; a version is written "
                               f"{_cut(name)}/<number>, e.g. {_cut(name)}/1", param="model", code="model_not_found")
        else:
            alias = "production"
        if name not in self.names:
            raise ApiError(404, f"The model `{_cut(model_id)}` does not exist; served: base, "
                           + ", ".join(f"{n}@production, {n}@candidate, {n}/<version>" for n in self.names),
                           param="model", code="model_not_found")
        try:
            mv = resolve(self.client, name, version=number, alias=alias)
        except RegistryError as exc:
            raise ApiError(404, f"The model `{_cut(model_id)}` does not exist: {_cut(str(exc), 200)}", param="model",
                           code="model_not_found") from None
        return self.download(name, str(mv.version))

    def download(self, name: str, number: str) -> Version:
        """A version's files, downloaded once (registered versions never change)."""
        from loraops.serving.pyfunc import model_files

        with self._lock:
            if (name, number) not in self._downloaded:
                try:
                    files = model_files(name, number, self.cache_dir / name / number)
                except LoraopsError as exc:
                    raise ApiError(400, str(exc), param="model", code="not_an_adapter") from None
                self._downloaded[(name, number)] = Version(name, number, files["adapter"], files["spec"], files.get("base"),
                                                           files.get("index"))
            return self._downloaded[(name, number)]

    def passages(self, version: Version | None, question: str) -> tuple[str, list[dict[str, Any]]]:
        """The ``{context}`` and its passages for a version registered with retrieval (empty otherwise)."""
        from loraops.serving.pyfunc import passages, retriever_for

        if version is None or not version.index_dir:
            return "", []
        with self._lock:
            key = ("retriever", version.name, version.number)
            if key not in self._retrievers:
                self._retrievers[key] = retriever_for(version.spec, version.index_dir)
            retriever = self._retrievers[key]
        with self._search_lock:  # kiwipiepy's analyser is not shared across threads
            return passages(retriever, version.spec, question)

    def startup_version(self) -> Version | None:
        """The version whose base the server loads: the first served model's production, else its newest version."""
        from loraops.registry.versions import versions_of

        for name in self.names:
            try:
                aliases = self.client.get_registered_model(name).aliases or {}
            except Exception:  # noqa: BLE001 - a model the catalogue cannot read (deleted, not allowed) is skipped
                continue
            number = aliases.get("production") or next((str(v.version) for v in reversed(versions_of(self.client, name))), None)
            if number:
                return self.download(name, str(number))
        return None


# ---------------------------------------------------------------- generation: one base, adapters, micro-batches


@dataclass
class Job:
    """One request waiting for, or being answered in, a batch; the worker pushes its events to ``sink``."""

    prompt: str  # the text the model reads, as the tokenizer encodes it without adding special tokens
    version: Version | None
    max_tokens: int
    stops: list[str]
    temperature: float
    top_p: float
    sink: Callable[[tuple], object]  # receives ("delta", text), ("done", finish, usage) or ("error", message)
    stop_ids: list[int] = field(default_factory=list)  # token ids that end the answer (EOS, end of turn)
    ignore_eos: bool = False
    # incremental decoding (:func:`_decoded`): text settled so far, and where the next decode starts
    settled: str = ""
    prefix: int = 0
    read: int = 0
    checked: int = 0  # tokens already searched for a stop id
    scanned: int = 0  # characters already searched for a stop string
    cancelled: bool = False
    sent: str = ""
    text: str = ""
    raw: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None

    def push(self, *event: Any) -> None:
        self.sink(event)


class QueueFull(Exception):
    pass


@dataclass
class Engine:
    """The base model with adapters loaded side by side, answering jobs in micro-batches on one worker thread."""

    base_location: str
    model_cfg: Any
    tokenizer_location: str
    identity: str
    max_batch: int = 16
    window_s: float = 0.01
    queue_size: int = 64
    max_adapters: int = 8
    device: str = "cpu"
    step_tokens: int = 8  # tokens a batch generates per turn before the worker turns to the next batch or new requests
    base_format: PromptFormat = field(default_factory=PromptFormat)  # how the ``base`` model id is prompted
    generating: int = field(init=False, default=0)  # rows of the running batch still generating (``/health``)
    cancelled: int = field(init=False, default=0)  # rows stopped because their client went away (``/health``)
    _queue: "queue.Queue[Job]" = field(init=False)
    _loaded: "OrderedDict[str, Version]" = field(init=False, default_factory=OrderedDict)
    _dora: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        from loraops.modeling.model import load_base, load_tokenizer

        dtype = "bf16" if self.device == "cuda" else "fp32"
        self.model = load_base(self.base_location, self.model_cfg, self.device, dtype=dtype).eval()
        self.tokenizer = load_tokenizer(self.tokenizer_location, self.model_cfg)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._queue = queue.Queue(maxsize=self.queue_size)
        self._thread = threading.Thread(target=self._work, name="loraops-generate", daemon=True)
        self._thread.start()

    # -- intake
    def waiting(self) -> int:
        return self._queue.qsize()

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def format_of(self, version: Version | None) -> PromptFormat:
        """The prompt format ``version`` was trained with (saved with its adapter); the base's for ``base``."""
        return version_format(version.adapter_dir) if version is not None else self.base_format

    def stop_ids(self, version: Version | None) -> list[int]:
        return self.format_of(version).stop_ids(self.tokenizer, self.model)

    def serves(self, version: Version | None) -> bool:
        """Whether ``version``'s adapter was trained on the base this engine holds (the base arm always is)."""
        return version is None or not version.spec or base_identity(version.spec, version.base_dir) == self.identity

    def submit(self, job: Job) -> None:
        if not self.serves(job.version):
            assert job.version is not None
            raise ApiError(400, f"{job.version.name}/{job.version.number} was trained on base "
                           f"{job.version.spec['base'].get('configured')!r}, not on the base this server holds "
                           f"({self.model_cfg.base!r}); serve it from its own `loraops serve`",
                           param="model", code="base_mismatch")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def answer(self, prompt: str, version: Version | None, max_tokens: int, stops: list[str]) -> tuple[str, str]:
        """Greedy answer for one prompt, waiting for its batch (for in-process callers such as the demo): the answer
        as shown (undecodable characters dropped) and as generated."""
        box: "queue.Queue[tuple]" = queue.Queue()
        job = Job(prompt=self.format_of(version).text(self.tokenizer, prompt), version=version, max_tokens=max_tokens,
                  stops=stops, temperature=0.0, top_p=1.0, sink=box.put, stop_ids=self.stop_ids(version))
        self.submit(job)
        while True:
            event = box.get()
            if event[0] == "error":
                raise LoraopsError(event[1])
            if event[0] == "done":
                return job.text, job.raw

    # -- worker: batches advance a few tokens at a time, in turn, so a request that arrives while a long answer is
    # being generated starts at the next turn instead of waiting for the end of it
    def _work(self) -> None:
        running: list[_Batch] = []
        while True:
            arrived = self._arrivals(wait=not running)
            if arrived:
                try:
                    running += self._batches(arrived, running)
                except Exception as exc:  # noqa: BLE001 - an adapter that cannot load answers its requests with 500
                    _log.exception("starting a batch failed")
                    for job in arrived:
                        job.push("error", f"generation failed: {exc}")
            for batch in list(running):
                try:
                    finished = self._advance_batch(batch)
                except Exception as exc:  # noqa: BLE001 - one failed batch answers its requests with 500, the server lives
                    _log.exception("generation failed")
                    for job in batch.jobs:
                        job.push("error", f"generation failed: {exc}")
                    finished = True
                if finished:
                    running.remove(batch)
            self.generating = sum(1 for b in running for j in b.jobs if j.finish is None)

    def _arrivals(self, wait: bool) -> list[Job]:
        """The requests waiting now (blocking for the first when nothing runs; then a short window for company)."""
        jobs: list[Job] = []
        try:
            jobs.append(self._queue.get() if wait else self._queue.get_nowait())
        except queue.Empty:
            return []
        deadline = time.monotonic() + (self.window_s if wait else 0.0)
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if wait
                            else self._queue.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled]

    def _batches(self, jobs: list[Job], running: list["_Batch"]) -> list["_Batch"]:
        """New batches for ``jobs``: one per sampling setting; adapters mixed in one batch (peft's ``adapter_names``),
        or one batch per adapter where a DoRA adapter is among them, since peft cannot mix DoRA adapters."""
        keep = {j.version.adapter_name for b in running for j in b.jobs if j.version is not None}
        self._ensure_adapters([j.version for j in jobs if j.version is not None], keep)
        out = []
        groups: dict[tuple[float, float], list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.temperature, job.top_p if job.temperature else 1.0), []).append(job)
        for (temperature, top_p), group in groups.items():
            if not any(j.version is not None and j.version.adapter_name in self._dora for j in group):
                out.append(_Batch(group, temperature, top_p, "mixed"))
                continue
            by_adapter: dict[str | None, list[Job]] = {}
            for job in group:
                by_adapter.setdefault(job.version.adapter_name if job.version else None, []).append(job)
            out += [_Batch(part, temperature, top_p, name or PEFT_BASE) for name, part in by_adapter.items()]
        return out

    def _ensure_adapters(self, versions: list[Version], keep: set[str] | None = None) -> None:
        """Load the versions' adapters beside the base; the least recently used goes when there are too many, never
        one a running batch (``keep``) or this batch needs."""
        from peft import PeftModel

        for version in versions:
            if version.adapter_name in self._loaded:
                self._loaded.move_to_end(version.adapter_name)
                continue
            needed = {v.adapter_name for v in versions} | (keep or set())
            while len(self._loaded) >= self.max_adapters:
                old = next((n for n in self._loaded if n not in needed), None)
                if old is None:
                    break
                self.model.delete_adapter(old)
                del self._loaded[old]
                self._dora.discard(old)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(version.adapter_dir, adapter_name=version.adapter_name)
            else:
                self.model = PeftModel.from_pretrained(self.model, version.adapter_dir, adapter_name=version.adapter_name).eval()
            self.model.to(self.device)
            self._loaded[version.adapter_name] = version
            if getattr(self.model.peft_config[version.adapter_name], "use_dora", False):
                self._dora.add(version.adapter_name)
            _log.info("loaded adapter %s", version.adapter_name)

    def _advance_batch(self, batch: "_Batch") -> bool:
        """Generate up to ``step_tokens`` more tokens for ``batch`` (prefilling its prompts on its first turn), from
        its own cache; True when every row has ended (answered: its "done" event pushed)."""
        import contextlib

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok, engine, jobs = self.tokenizer, self, batch.jobs
        if batch.sequences is None:
            enc = tok([j.prompt for j in jobs], return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            batch.sequences, batch.mask, batch.width = enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1]
            for job, mask in zip(jobs, enc["attention_mask"]):
                job.prompt_tokens = int(mask.sum())
                if not job.ignore_eos:
                    job.stop_ids = job.stop_ids or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        width = batch.width
        # rows stop on their own ids (the criteria below); generate's list only ends rows early, so none if a row
        # ignores EOS
        eos = None if any(j.ignore_eos for j in jobs) else list(dict.fromkeys(i for j in jobs for i in j.stop_ids)) or None

        class _Rows(StoppingCriteria):
            """Per row: decode the new tokens, stream what is final, stop on its own limits."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = []
                for row, job in enumerate(jobs):
                    if job.finish is None and not job.cancelled:
                        _advance(job, input_ids[row, width:].tolist(), tok)
                    elif job.finish is None and job.cancelled:
                        job.finish = "cancelled"
                        engine.cancelled += 1
                    done.append(job.finish is not None)
                return torch.tensor(done, device=input_ids.device)

        kwargs: dict[str, Any] = {}
        scope: Any = contextlib.nullcontext()
        if batch.adapter == "mixed" and hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [j.version.adapter_name if j.version else PEFT_BASE for j in jobs]
        elif batch.adapter == PEFT_BASE:
            scope = self.model.disable_adapter()
        elif batch.adapter != "mixed":
            self.model.set_adapter(batch.adapter)
        sampling = ({"do_sample": True, "temperature": batch.temperature, "top_p": batch.top_p} if batch.temperature > 0
                    else {"do_sample": False})
        made = batch.sequences.shape[1] - width
        left = max(j.max_tokens for j in jobs if j.finish is None) - made if any(j.finish is None for j in jobs) else 0
        if left > 0 and not all(j.cancelled for j in jobs if j.finish is None):
            with torch.inference_mode(), scope:
                out = self.model.generate(input_ids=batch.sequences, attention_mask=batch.mask,
                                          past_key_values=batch.cache, max_new_tokens=min(self.step_tokens, left),
                                          num_beams=1, stopping_criteria=StoppingCriteriaList([_Rows()]),
                                          pad_token_id=tok.pad_token_id, eos_token_id=eos, return_dict_in_generate=True,
                                          **sampling, **kwargs)
            grown = out.sequences.shape[1] - batch.sequences.shape[1]
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(jobs), grown))], dim=1)
            batch.sequences, batch.cache = out.sequences, out.past_key_values
            made += grown
            if any(j.finish is None for j in jobs) and made < max(j.max_tokens for j in jobs) and grown:
                return False
        for row, job in enumerate(jobs):
            if job.finish is None:
                if job.cancelled:
                    job.finish = "cancelled"
                    engine.cancelled += 1
                else:
                    _advance(job, batch.sequences[row, width:].tolist(), tok, final=True)
            job.push("done", job.finish, {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.tokens,
                                          "total_tokens": job.prompt_tokens + job.tokens})
        return True


@dataclass
class _Batch:
    """Requests generated together: their tokens so far, attention mask and cache between turns."""

    jobs: list[Job]
    temperature: float
    top_p: float
    adapter: str  # "mixed" (peft's adapter_names per row), PEFT_BASE (adapters off) or one adapter's name
    sequences: Any = None
    mask: Any = None
    cache: Any = None
    width: int = 0  # prompt width (left-padded): a row's answer is sequences[row, width:]


def _advance(job: Job, tokens: list[int], tok: Any, final: bool = False) -> None:
    """Take a row's new tokens: settle its text, push the part no later token can change, note why it ended."""
    from loraops.judge.degenerate import clean
    from loraops.modeling.generation import clean_answer

    stops = set(job.stop_ids)
    end = next((k for k in range(job.checked, len(tokens)) if tokens[k] in stops), None)  # only the new tokens
    if end is not None:
        tokens, job.finish = tokens[:end], "stop"
    job.checked = len(tokens)
    if len(tokens) >= job.max_tokens:
        tokens = tokens[: job.max_tokens]
        job.finish = job.finish or "length"
    raw = _decoded(job, tokens, tok)
    job.tokens = len(tokens)
    tail = raw[max(0, job.scanned - max((len(s) for s in job.stops), default=0)):]  # a stop string ending in new text
    job.scanned = len(raw)
    if any(s and s in tail for s in job.stops):
        job.finish = "stop"
    if final and job.finish is None:
        job.finish = "length"
    if job.finish is not None:
        job.raw = clean_answer(raw, job.stops)  # as generated, undecodable bytes included (what the gate judges)
        text = clean(job.raw)[0]
    else:  # hold back what may still change: a torn character, trailing spaces, the start of a stop string
        text = raw.lstrip().rstrip("\ufffd").rstrip()
        for stop in job.stops:
            for size in range(min(len(stop), len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    text = text[:-size].rstrip()
                    break
        text = clean(text)[0]
    if text.startswith(job.sent) and len(text) > len(job.sent):
        job.push("delta", text[len(job.sent):])
        job.sent = text
    job.text = text


def _decoded(job: Job, tokens: list[int], tok: Any) -> str:
    """The text of ``tokens``, decoding only what is new since the last step: the text up to ``job.read`` is settled
    once it ends in whole characters; the new part is what decoding ``tokens[job.prefix:]`` adds to decoding
    ``tokens[job.prefix:job.read]`` (the same start, so a tokenizer that drops a leading space drops it from both).
    Cost per step: the few tokens since the last settled one, not the answer so far."""
    if len(tokens) < job.read:  # cut back (a stop token, max_tokens): decode from the start once
        job.settled, job.prefix, job.read = "", 0, 0
    head = tok.decode(tokens[job.prefix:job.read], skip_special_tokens=True)
    new = tok.decode(tokens[job.prefix:], skip_special_tokens=True)
    if not new.startswith(head):  # a decoder that rewrites across the boundary: this once, decode it all
        whole = tok.decode(tokens, skip_special_tokens=True)
        if whole.endswith("\ufffd"):
            return whole
        job.settled, job.prefix, job.read = whole, job.read, len(tokens)
        return whole
    fresh = new[len(head):]
    if fresh and not fresh.endswith("\ufffd"):  # whole characters: settle them
        job.settled += fresh
        job.prefix, job.read = job.read, len(tokens)
        return job.settled
    return job.settled + fresh


# ---------------------------------------------------------------- the HTTP API


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    metadata: Optional[dict[str, str]] = None
    stream_options: Optional[dict[str, Any]] = None
    ignore_eos: bool = False  # vLLM's extension (benchmarks use it): generate max_tokens, ending only on stop strings
    logprobs: Union[bool, int, None] = None
    tools: Optional[list[Any]] = None
    echo: bool = False

    def unsupported(self) -> str | None:
        """The first requested feature this server does not provide (answered 400, never silently ignored)."""
        if self.logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.echo:
            return "echo"
        return None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: Union[str, list[str]]


@dataclass
class Settings:
    names: list[str]
    default_template: str
    default_generation: dict[str, Any]
    max_tokens_limit: int = 1024
    api_key: str | None = None
    last_user_only: bool = False  # a plain-template version answers the last user message of a longer chat
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1_000_000

    def prompt(self, version: Version | None, question: str, fields: dict[str, str] | None = None) -> str:
        """The question through the version's template (the project's for ``base``); absent fields render empty."""
        template = version.spec["template"] if version else self.default_template
        return template.format_map(_Blank({**(fields or {}), "question": question}))

    def generation(self, version: Version | None) -> dict[str, Any]:
        return version.spec["generation"] if version else self.default_generation


def create_app(catalog: Catalog, engine: Engine, settings: Settings) -> Any:
    """The FastAPI app: routes, OpenAI-shaped errors, optional bearer key."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="loraops", description="OpenAI-compatible API over the registered LoRA adapters")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(ApiError(400, f"{param or 'body'}: {first.get('msg')}", param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    if settings.api_key:
        app.add_middleware(KeyGuard, key=settings.api_key)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)  # outermost: before anything reads the body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": engine.waiting(), "generating": engine.generating,
                "cancelled": engine.cancelled, "adapters": engine.loaded()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await run_in_threadpool(catalog.entries)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for entry in await run_in_threadpool(catalog.entries):
            if entry["id"] == model_id:
                return entry
        raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")

    async def _answer(body: _Body, prompt: str, version: Version | None, kind: str,
                      sources: list[dict[str, Any]] | None = None, request: Request | None = None) -> Any:
        """Answer ``prompt``, the text the model reads (rendered through the version's prompt format)."""
        missing = body.unsupported()
        if missing:
            raise ApiError(400, f"{missing}: not supported by loraops serve", param=missing, code="unsupported_parameter")
        generation = settings.generation(version)
        limit = body.max_completion_tokens or body.max_tokens
        if limit is not None and limit > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {limit}; this server allows at most {settings.max_tokens_limit} "
                           "(loraops serve --max-tokens-limit)", param="max_tokens", code="max_tokens_too_large")
        max_tokens = limit or int(generation["max_new_tokens"])
        if len(prompt) > settings.max_prompt_tokens * 8:  # more characters than any tokenizer packs into the limit
            raise ApiError(400, f"The prompt has {len(prompt)} characters; this server takes at most "
                           f"{settings.max_prompt_tokens} prompt tokens (loraops serve --max-prompt-tokens)",
                           param="messages" if kind == "chat" else "prompt", code="prompt_too_long")
        prompt_tokens = await run_in_threadpool(engine.count_tokens, prompt)  # never on the event loop
        if prompt_tokens > settings.max_prompt_tokens:
            raise ApiError(400, f"The prompt has {prompt_tokens} tokens; this server takes at most "
                           f"{settings.max_prompt_tokens} (loraops serve --max-prompt-tokens)",
                           param="messages" if kind == "chat" else "prompt", code="prompt_too_long")
        if engine.context and prompt_tokens + max_tokens > engine.context:
            raise ApiError(400, f"This model's maximum context length is {engine.context} tokens; the prompt has "
                           f"{prompt_tokens} and max_tokens asks for {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        loop, events = asyncio.get_running_loop(), asyncio.Queue[tuple]()
        temperature = body.temperature or 0.0
        temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature  # too small to sample with: greedy
        job = Job(prompt=prompt, version=version, max_tokens=max_tokens, stops=[*generation.get("stop_strings", []), *stops],
                  temperature=temperature, top_p=body.top_p or 1.0,
                  sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                  stop_ids=[] if body.ignore_eos else engine.stop_ids(version), ignore_eos=body.ignore_eos)
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"The server is busy: {engine.waiting()} requests are waiting; retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        made, ident = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        headers = {"X-Loraops-Warning": version.warning} if version is not None and version.warning else None
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(job, events, body.model, kind, made, ident, usage, sources),
                                     media_type="text/event-stream", headers=headers)
        try:
            checked = time.monotonic()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = ("wait",)
                if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled = True  # the client went away: its row stops at the next step
                        return JSONResponse({}, status_code=499)  # nobody reads it
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                if event[0] == "done":
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        finish, usage = event[1], event[2]
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None, "finish_reason": finish}
                  if kind == "chat" else {"index": 0, "text": job.text, "logprobs": None, "finish_reason": finish})
        out = {"id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": made,
               "model": body.model, "choices": [choice], "usage": usage}
        out |= {"sources": sources} if sources else {}
        return JSONResponse(out, headers=headers) if headers else out

    async def _sse(job: Job, events: asyncio.Queue, model_id: str, kind: str, made: int, ident: str,
                   include_usage: bool = False, sources: list[dict[str, Any]] | None = None) -> Any:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat":
                body = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            extra = {"sources": sources} if first and sources else {}
            return "data: " + json.dumps({"id": ident, "object": obj, "created": made, "model": model_id,
                                          "choices": [choice], **extra}, ensure_ascii=False) + "\n\n"

        try:
            if kind == "chat":
                yield chunk(None, None, first=True)
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield chunk(event[1], None)
                elif event[0] == "error":
                    yield "data: " + json.dumps(ApiError(500, event[1], kind="server_error").body()) + "\n\n"
                    break
                else:
                    yield chunk(None, event[1])
                    if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
                        yield "data: " + json.dumps({"id": ident, "object": obj, "created": made, "model": model_id,
                                                     "choices": [], "usage": event[2]}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = job.finish is None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        for number, message in enumerate(body.messages):
            _text_or_400(message.text(), f"messages[{number}].content")
        _text_or_400(json.dumps(body.metadata or {}, ensure_ascii=False), "metadata")
        version = await run_in_threadpool(catalog.resolve, body.model)
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users or not body.messages[users[-1]].text().strip():
            raise ApiError(400, "messages: needs a user message with text (the question)", param="messages")
        last = users[-1]
        if last != len(body.messages) - 1:
            raise ApiError(400, "messages: the last message must be the user's (the question to answer)", param="messages")
        if any(m.role == "tool" for m in body.messages):
            raise ApiError(400, "messages: tool messages are not supported by loraops serve", param="messages",
                           code="unsupported_parameter")
        question = body.messages[last].text()
        context, sources = await run_in_threadpool(catalog.passages, version, question)
        fields = {**(body.metadata or {}), **({"context": context} if sources else {})}
        prompt = settings.prompt(version, question, fields)
        fmt = engine.format_of(version)
        if fmt.chat:  # the earlier turns as sent, the question through the template the version was trained with
            turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            turns[last]["content"] = prompt
            try:
                text = fmt.conversation(engine.tokenizer, turns)
            except Exception as exc:  # noqa: BLE001 - the template's own refusal (raise_exception), e.g. roles out of order
                raise ApiError(400, f"messages: the chat template refuses them: {str(exc)[:300]}", param="messages") from None
        else:
            extra = [m.role for m in body.messages[:last]]
            if extra and not settings.last_user_only:
                name = f"{version.name}/{version.number}" if version else "base"
                raise ApiError(400, f"messages: {name} was trained with a plain prompt template (no chat template), "
                               f"which has no place for {', '.join(sorted(set(extra)))} messages; send only the user's "
                               "question, or start the server with --last-user-message-only", param="messages",
                               code="unsupported_messages")
            text = fmt.text(engine.tokenizer, prompt)
        return await _answer(body, text, version, "chat", sources, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise ApiError(400, "prompt: one prompt per request", param="prompt")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        _text_or_400(prompt, "prompt")
        version = await run_in_threadpool(catalog.resolve, body.model)
        return await _answer(body, (engine.tokenizer.bos_token or "") + prompt, version, "completion", request=request)

    return app


def _cut(text: str, limit: int = 120) -> str:
    """``text`` cut for an error message (a client's id is echoed, never a megabyte of it)."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _text_or_400(text: str, param: str) -> None:
    """Refuse text that is no Unicode text: JSON may carry a lone surrogate (``"\\ud800"``), which no tokenizer
    encodes; it would fail the whole batch it joined."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param}: not valid Unicode text (a lone surrogate at character {exc.start})",
                       param=param, code="invalid_text") from None


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is read (by its
    Content-Length) or as soon as the bytes read pass the limit (chunked); nothing downstream sees it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen, started = 0, False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(ApiError(413, f"The request body is larger than {self.limit} bytes (loraops serve "
                                   "--max-body-bytes)", code="body_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _send_error(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class KeyGuard:
    """ASGI middleware: with ``LORAOPS_API_KEY`` set, every path but ``/health`` (the API, ``/docs``,
    ``/openapi.json``) needs ``Authorization: Bearer <key>``, compared in constant time. (Plain ASGI, not
    Starlette's BaseHTTPMiddleware, so a request still sees its client disconnect.)"""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _send_error(send, ApiError(401, "Incorrect API key provided (Authorization: Bearer "
                                                 "$LORAOPS_API_KEY)", code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def open_engine(params: Any, names: list[str], max_batch: int = 16, queue_size: int = 64, max_tokens_limit: int = 1024,
                cache_dir: Path | None = None, last_user_only: bool = False, max_prompt_tokens: int = 4096,
                max_body_bytes: int = 1_000_000, step_tokens: int = 8) -> tuple[Catalog, Engine, Settings, Version | None]:
    """Catalog, engine and settings for the served models; the base is the startup version's (else ``model.base``)."""
    from loraops.core.config import ModelSection
    from loraops.core.utils import pick_device
    from loraops.modeling.model import base_location
    from loraops.modeling.prompting import resolve as resolve_format

    catalog = Catalog(names, cache_dir or Path(tempfile.mkdtemp(prefix="loraops-serve-")))
    first = catalog.startup_version()
    if first is not None:
        spec = first.spec
        cfg = ModelSection(base=spec["base"].get("configured") or spec["base"]["id"], revision=spec["base"].get("revision"),
                           trust_remote_code=spec["base"].get("trust_remote_code", False))
        location, tokenizer = first.base_dir or spec["base"]["id"], first.adapter_dir
        identity = base_identity(spec, first.base_dir)
    else:
        cfg, location = params.model, base_location(params.model)
        tokenizer, identity = location, base_identity({"base": {"configured": params.model.base, "revision": params.model.revision}},
                                                      location if Path(location).is_dir() else None)
    engine = Engine(location, cfg, tokenizer, identity, max_batch=max_batch, queue_size=queue_size, device=pick_device("auto"),
                    step_tokens=step_tokens)
    try:  # `base` is prompted as the project would train it (an instruct base through its chat template)
        engine.base_format = resolve_format(params.data.chat_template, params.data.system_prompt, engine.tokenizer)
    except LoraopsError as exc:
        _log.warning("the base model id answers with the plain template: %s", exc)
    generation = {"max_new_tokens": params.eval.max_new_tokens, "stop_strings": params.eval.stop_strings}
    settings = Settings(names, params.data.template, generation, max_tokens_limit, os.environ.get("LORAOPS_API_KEY") or None,
                        last_user_only, max_prompt_tokens, max_body_bytes)
    return catalog, engine, settings, first
