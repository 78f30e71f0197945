"""What a registered version carries besides its adapter: the spec the pyfunc model reads (base, template, decoding,
retrieval), its MLflow signature, and whether the base travels inside it.

The registry writes these at registration and the serving layer reads them; both import them from here, so the
registry never imports the serving code (the pyfunc model itself is logged by path, ``PYFUNC_MODEL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUNDLE_LIMIT_BYTES = 200 * 1024 * 1024  # local bases under this size travel inside the model
PYFUNC_MODEL = Path(__file__).parents[1] / "serving" / "pyfunc_model.py"
"""The file MLflow logs as the version's python_model (it imports ``loraops.serving.pyfunc`` when the model loads)."""


def signature(template_fields: list[str], retrieval: bool = False) -> Any:
    """Question strings in, answer strings out.

    A template that uses only ``{question}`` takes a list of questions (or a one-column table); one that also
    uses ``{category}`` or attribute columns takes a table with a ``question`` column and optional columns for
    the other fields (MLflow checks inputs against this before ``predict``).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    others = [name for name in dict.fromkeys(template_fields) if name not in ("question", "context")]
    if not others:
        inputs = Schema([ColSpec("string")])
    else:
        inputs = Schema([ColSpec("string", "question"), *(ColSpec("string", name, required=False) for name in others)])
    outputs = Schema([ColSpec("string", "answer"), ColSpec(Array("string"), "sources")]) if retrieval \
        else Schema([ColSpec("string")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def model_spec(params: Any, base_location: str) -> dict[str, Any]:
    """What the pyfunc needs besides the adapter: base reference, template, decoding settings, and for a version
    trained with retrieval the settings that look up its passages."""
    rag = params.rag
    retrieval = {"rag": {"mode": rag.mode, "k": rag.k, "max_context_chars": rag.max_context_chars, "rrf_k": rag.rrf_k,
                         "tokenizer": rag.tokenizer, "encoder": rag.encoder, "corpus": rag.corpus},
                 "morphemes": {"morph_pos": params.eval.morph_pos, "morph_analyzer": params.eval.morph_analyzer}}
    return {
        "base": {"id": str(Path(base_location).resolve()) if Path(base_location).exists() else params.model.base,
                 "configured": params.model.base, "revision": params.model.revision,
                 "trust_remote_code": params.model.trust_remote_code},
        "template": params.prompt_template,
        "generation": {"max_new_tokens": params.eval.max_new_tokens, "batch_size": params.eval.batch_size,
                       "stop_strings": params.eval.stop_strings},
        "retrieval": retrieval if rag.enabled else None,
    }


def should_bundle(base_location: str) -> bool:
    """Bundle a local base directory into the model when it is small enough."""
    path = Path(base_location)
    return path.is_dir() and sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < BUNDLE_LIMIT_BYTES
