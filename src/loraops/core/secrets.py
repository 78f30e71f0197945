"""Secrets stay in the environment: never in params, the lineage card, MLflow, Prefect parameters or logs.

Tokens and keys (``HF_TOKEN``, ``OPENAI_API_KEY``, ``MLFLOW_TRACKING_PASSWORD``, anything named like a secret)
are read from the environment by the libraries that need them. loraops

- refuses a params value that looks like a token or holds a secret's value (``config.validate``);
- redacts what it records or prints anyway: the lineage card (a dirty tree's diff may hold a key), MLflow
  params and tags, the stage output streamed into the Prefect log.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|SECRET_?KEY|PRIVATE_?KEY)(_|$)", re.I)
"""Environment variable names whose values are secrets: ``HF_TOKEN``, ``OPENAI_API_KEY``, ``MLFLOW_TRACKING_PASSWORD``,
``AWS_SECRET_ACCESS_KEY`` (not ``TOKENIZERS_PARALLELISM`` or ``SSH_AUTH_SOCK``, whose values are no secrets)."""
SECRET_FIELD = re.compile(r"(^|[_.-])(token|secret|passw(or)?d|api[_-]?key|access[_-]?key|credentials?|private[_-]?key)$",
                          re.I)
"""Field names whose string values are secrets (``hf_token``, ``api_key``; not ``max_new_tokens``)."""
TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}"
                          r"|xox[baprs]-[A-Za-z0-9-]{10,})\b")
"""Well-known token formats: Hugging Face, OpenAI, GitHub, AWS access key ids, Slack."""
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+:)(?P<password>[^@\s]+)(?=@)", re.I)
MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would mask ordinary text


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of the environment variables named like secrets, longest first."""
    env = os.environ if environ is None else environ
    found = {value for name, value in env.items() if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """``text`` with secret values, token-shaped strings and URL passwords masked."""
    for value in secret_values() if values is None else values:
        text = text.replace(value, MASK)
    text = TOKEN_SHAPES.sub(MASK, text)
    return URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with secrets masked; a field named like a secret is masked whole."""
    values = secret_values() if values is None else values
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and SECRET_FIELD.search(k) and isinstance(v, str) and v
                    else redact(v, values)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, values) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, values)
    return obj


def find_secret(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first value in ``obj`` that is (or holds) a secret, else None."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = find_secret(value, f"{prefix}{key}.")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found = find_secret(value, f"{prefix}{index}.")
            if found:
                return found
        return None
    if isinstance(obj, str) and redact_text(obj) != obj:
        return prefix.rstrip(".")
    return None
