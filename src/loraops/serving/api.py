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
import hmac
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request  # module level: FastAPI resolves the endpoints' annotations here

from loraops.core.errors import LoraopsError
from loraops.serving.catalog import ApiError, Catalog, Version, base_identity
from loraops.serving.engine import Engine, Job, QueueFull

_log = logging.getLogger("loraops.api")

DISCONNECT_POLL_S = 0.25
"""How often a waiting non-streaming request checks that its client is still there."""
MIN_TEMPERATURE = 1e-5
"""Below this a temperature cannot be sampled with (the logits overflow): such a request is answered greedily."""


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
