"""The generation engine behind ``loraops serve`` and the demo: one base model in memory, each requested version's
adapter loaded next to it (peft named adapters), and a worker thread that micro-batches waiting requests in turns
of a few tokens, adapters mixed in one batch, each row stopping on its own limit, stop strings or end of text, its
text decoded incrementally."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from loraops.core.errors import LoraopsError
from loraops.modeling.prompting import PromptFormat
from loraops.serving.catalog import ApiError, Version, base_identity, version_format

_log = logging.getLogger("loraops.api")
PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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
