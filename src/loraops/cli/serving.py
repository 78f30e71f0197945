"""`loraops serve | demo | export`: what the registry says, served over HTTP, compared in a browser, exported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, registry_params, user_path

export_app = typer.Typer(no_args_is_help=True, help="Export a registered adapter: a merged model, or vLLM's LoRA flags.")
app.add_typer(export_app, name="export")

ModelsOpt = typer.Option(None, "--model", help="Registered model to serve (repeatable; default registry.model_name).")


def _loopback_warning(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("LORAOPS_API_KEY"):
        typer.secho(f"warning: listening on {host} without LORAOPS_API_KEY: anyone who reaches this port can use it",
                    fg=typer.colors.YELLOW, err=True)


@app.command()
@friendly
def serve(host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
          port: int = typer.Option(8000, "--port"),
          model: Optional[list[str]] = ModelsOpt,
          max_batch: int = typer.Option(16, "--max-batch", min=1, help="Requests answered together in one batch."),
          queue_size: int = typer.Option(64, "--queue-size", min=1, help="Waiting requests beyond which the server answers 429."),
          max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", min=1, help="Largest max_tokens a request may ask for."),
          max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", min=1,
                                                help="Longest prompt a request may send, in tokens (400 beyond)."),
          max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1024,
                                             help="Largest request body (413 beyond), read by nobody."),
          step_tokens: int = typer.Option(8, "--step-tokens", min=1,
                                          help="Tokens a batch generates per turn before new requests join in."),
          last_user_only: bool = typer.Option(False, "--last-user-message-only",
                                              help="A version trained without a chat template answers the last user "
                                                   "message of a longer chat (else such a request is refused with 400)."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the registered adapters."""
    import uvicorn

    from loraops.serving import api

    p = registry_params(params, set_)
    names = model or [p.registry.model_name]
    _loopback_warning(host)
    catalog, engine, settings, first = api.open_engine(p, names, max_batch=max_batch, queue_size=queue_size,
                                                       max_tokens_limit=max_tokens_limit, last_user_only=last_user_only,
                                                       max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                                                       step_tokens=step_tokens)
    where = f"{first.name}/{first.number}'s base" if first else f"model.base {p.model.base!r} (nothing registered yet)"
    typer.echo(f"serving base + {', '.join(names)} (@production, @candidate, /<version>) on http://{host}:{port}/v1; "
               f"base from {where}; device {engine.device}")
    uvicorn.run(api.create_app(catalog, engine, settings), host=host, port=port, log_level="warning")


@export_app.command("merged")
@friendly
def export_merged(uri: str = typer.Argument(..., help="models:/<name>@<alias> or models:/<name>/<version>."),
                  out: Path = typer.Option(..., "--out", help="New folder for the merged model (safetensors + tokenizer).")) -> None:
    """Base + adapter merged (merge_and_unload) into one standalone model folder."""
    from loraops.serving import export

    result = export.merged(uri, user_path(out.parent) / out.name)
    typer.echo(f"wrote {result['out']} ({result['source']} merged into its base)")
    for note in result["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)


@export_app.command("vllm")
@friendly
def export_vllm(uri: str = typer.Argument(..., help="models:/<name>@<alias> or models:/<name>/<version>."),
                out: Optional[Path] = typer.Option(None, "--out", help="New folder (default exports/<name>-v<version>-vllm)."),
                params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """vLLM's --lora-modules JSON and `vllm serve` command line for a registered adapter."""
    from loraops.serving import export
    from loraops.serving.pyfunc import parse_uri

    name = parse_uri(uri)[0]
    target = user_path(out.parent) / out.name if out else Path("exports") / f"{name}-{uri.rsplit('@', 1)[-1].rsplit('/', 1)[-1]}-vllm"
    result = export.vllm(uri, target)
    typer.echo(f"wrote {result['out']}/lora-modules.json and serve.sh ({result['source']}); prompt template: "
               f"{result['template']!r}\n{result['command']}")
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


@app.command()
@friendly
def demo(host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
         port: int = typer.Option(7860, "--port"),
         model: Optional[str] = typer.Option(None, "--model", help="Registered model (default registry.model_name)."),
         params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Gradio page: base / production / candidate answers side by side, rated into MLflow, corrections kept."""
    from loraops.serving import demo as page

    p = registry_params(params, set_)
    if host not in ("127.0.0.1", "localhost", "::1") and page.authentication(dict(os.environ)) is None:
        typer.secho(f"warning: the demo listens on {host} without sign-in (set LORAOPS_DEMO_USERS=name:password,… or "
                    "LORAOPS_API_KEY): anyone who reaches this port can rate the versions, and the gate reads ratings",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(f"demo of {model or p.registry.model_name} on http://{host}:{port}")
    page.launch(p, model or p.registry.model_name, host, port)
