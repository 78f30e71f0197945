"""What ``loraops serve`` serves: the registry's versions of the named models (``<name>@<alias>``, ``<name>/<n>``),
read from MLflow on every call, each version's adapter downloaded once into a cache, its prompt format and base."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops.core.errors import LoraopsError
from loraops.modeling.prompting import PromptFormat

BASE = "base"

def shown(text: str, limit: int = 120) -> str:
    """``text`` cut for an error message (a client's id is echoed, never a megabyte of it)."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


class ApiError(LoraopsError):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
                raise ApiError(404, f"The model `{shown(model_id)}` does not exist; a version is written "
                               f"{shown(name)}/<number>, e.g. {shown(name)}/1", param="model", code="model_not_found")
        else:
            alias = "production"
        if name not in self.names:
            raise ApiError(404, f"The model `{shown(model_id)}` does not exist; served: base, "
                           + ", ".join(f"{n}@production, {n}@candidate, {n}/<version>" for n in self.names),
                           param="model", code="model_not_found")
        try:
            mv = resolve(self.client, name, version=number, alias=alias)
        except RegistryError as exc:
            raise ApiError(404, f"The model `{shown(model_id)}` does not exist: {shown(str(exc), 200)}", param="model",
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
