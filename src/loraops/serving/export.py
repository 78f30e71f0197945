"""`loraops export`: a registered adapter as a standalone merged model, or as vLLM's LoRA flags.

``merged``: the base (in full precision: a 4-bit-trained adapter is merged onto the dequantized base, and
the command says so) with the adapter folded in by peft's ``merge_and_unload`` (LoRA and DoRA alike), saved
as safetensors with its tokenizer and a ``loraops_export.json`` naming the source version, its prompt
template and decoding settings. Answers with that template equal the adapter's.

``vllm``: the adapter copied next to a ``lora-modules.json`` and the ``vllm serve`` command line that serves
it under the registry's name, with the rank vLLM must allow. vLLM applies LoRA to linear layers only: an
adapter that also trains whole modules (``modules_to_save``, e.g. embeddings) is reported, with the merged
export as the way to serve it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraops.core.errors import ConfigError
from loraops.modeling.prompting import PromptFormat


def _version(uri: str, work: Path) -> tuple[str, str, dict[str, Any]]:
    from loraops.registry.versions import mlflow_client, resolve
    from loraops.serving.pyfunc import model_files, parse_uri

    name, number, alias = parse_uri(uri)
    mv = resolve(mlflow_client(), name, version=number, alias=alias)
    return name, str(mv.version), model_files(name, str(mv.version), work)


def _target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder")


def merge(base_location: str, model_cfg: Any, adapter_dir: str, out: Path, meta: dict[str, Any]) -> Path:
    """Fold the adapter into a full-precision copy of the base and save both as one model in ``out``.

    Written to a temporary folder beside ``out`` and renamed into place: an interrupted export leaves nothing.
    """
    from peft import PeftModel

    from loraops.core.utils import write_json
    from loraops.modeling.model import load_base, load_tokenizer

    _target(out)
    base = load_base(base_location, model_cfg, "cpu", dtype="fp32")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(adapter_dir, model_cfg)
    fmt = PromptFormat.read(adapter_dir)
    tokenizer.chat_template = fmt.chat_template  # what it was trained with; a plain version keeps none of the base's
    if fmt.chat:  # plain `generate` and vLLM stop where the trained turn ends
        merged.generation_config.eos_token_id = fmt.stop_ids(tokenizer, merged)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "loraops_export.json", meta)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merged(uri: str, out: Path) -> dict[str, Any]:
    """Export ``uri`` (models:/name@alias or models:/name/version) merged into ``out``."""
    from loraops.core.config import ModelSection

    _target(out)
    with tempfile.TemporaryDirectory(prefix="loraops-export-") as work:
        name, number, files = _version(uri, Path(work))
        spec = files["spec"]
        lineage = json.loads(Path(files["lineage"]).read_text(encoding="utf-8")) if files.get("lineage") else {}
        quantized = (lineage.get("params", {}).get("train", {}).get("quantization") == "4bit")
        peft_type = json.loads((Path(files["adapter"]) / "adapter_config.json").read_text(encoding="utf-8"))
        cfg = ModelSection(base=spec["base"].get("configured") or spec["base"]["id"], revision=spec["base"].get("revision"),
                           trust_remote_code=spec["base"].get("trust_remote_code", False))
        notes = []
        if quantized:
            notes.append("the adapter was trained on the 4-bit (QLoRA) base; it is merged onto the dequantized "
                         "full-precision base, so answers can differ slightly from the 4-bit model's")
        if peft_type.get("use_dora"):
            notes.append("DoRA adapter: magnitude and direction folded into the weights")
        fmt = PromptFormat.read(files["adapter"])
        if not fmt.chat:
            notes.append("trained with the plain prompt template (no chat template): prompt the merged model with "
                         f"{spec['template']!r}; it carries no chat template")
        meta = {"source": f"models:/{name}/{number}", "requested": uri, "base": spec["base"], "template": spec["template"],
                "prompt_format": fmt.to_json(), "generation": spec["generation"],
                "adapter_sha256": lineage.get("adapter_sha256"), "notes": notes}
        merge(files.get("base") or spec["base"]["id"], cfg, files["adapter"], out, meta)
    return {"out": str(out), "source": meta["source"], "notes": notes}


def vllm(uri: str, out: Path) -> dict[str, Any]:
    """Copy the adapter to ``out`` and write vLLM's ``--lora-modules`` JSON and command line for it.

    Written to a temporary folder beside ``out`` and renamed into place: an interrupted export leaves nothing.
    """
    from loraops.core.utils import atomic_dir

    _target(out)
    final = out.resolve()
    with tempfile.TemporaryDirectory(prefix="loraops-export-") as work, atomic_dir(out) as stage:
        name, number, files = _version(uri, Path(work))
        spec = files["spec"]
        config = json.loads((Path(files["adapter"]) / "adapter_config.json").read_text(encoding="utf-8"))
        shutil.copytree(files["adapter"], stage / "adapter")
        base = spec["base"]["configured"]
        if files.get("base"):  # a small local base travels with the model: ship it too
            shutil.copytree(files["base"], stage / "base")
            base = str(final / "base")
        module = {"name": f"{name}@{uri.rsplit('@', 1)[1]}" if "@" in uri else f"{name}/{number}",
                  "path": str(final / "adapter"), "base_model_name": base}
        rank = max([config.get("r", 8), *config.get("rank_pattern", {}).values()])
        command = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(_pow2(rank)),
                   "--lora-modules", json.dumps(module, ensure_ascii=False)]
        if spec["base"].get("revision"):
            command[3:3] = ["--revision", spec["base"]["revision"]]
        fmt = PromptFormat.read(files["adapter"])
        if fmt.chat:  # vLLM renders chat requests with the base's template unless told: the one it was trained with
            assert fmt.chat_template is not None
            (stage / "chat_template.jinja").write_text(fmt.chat_template, encoding="utf-8")
            command += ["--chat-template", str(final / "chat_template.jinja")]
        (stage / "lora-modules.json").write_text(json.dumps([module], ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (stage / "serve.sh").write_text("#!/bin/sh\n# " + f"models:/{name}/{number} ({uri})\n" + shlex.join(command) + "\n",
                                        encoding="utf-8")
    warnings = []
    if config.get("modules_to_save"):
        warnings.append(f"the adapter also trains whole modules ({', '.join(config['modules_to_save'])}); vLLM applies "
                        "LoRA to linear layers only and will refuse or ignore them: serve `loraops export merged` instead")
    if config.get("use_dora"):
        warnings.append("DoRA adapters are not served by vLLM's LoRA support: serve `loraops export merged` instead")
    if not fmt.chat:
        warnings.append(f"trained with the plain prompt template {spec['template']!r}: send it through vLLM's "
                        "/v1/completions; its chat endpoint would apply the base's chat template, which it was not "
                        "trained on")
    if fmt.system_prompt:
        warnings.append("trained with a system prompt: send it as the system message (vLLM adds none by itself)")
    return {"out": str(out), "source": f"models:/{name}/{number}", "command": shlex.join(command), "module": module,
            "warnings": warnings, "template": spec["template"]}


def _pow2(n: int) -> int:
    """vLLM's --max-lora-rank takes 8, 16, 32, 64, ...: the smallest one ≥ n."""
    size = 8
    while size < n:
        size *= 2
    return size
