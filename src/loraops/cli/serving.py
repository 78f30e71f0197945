"""`loraops serve | demo | export`: what the registry says, served over HTTP, compared in a browser, exported."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, user_path

export_app = typer.Typer(no_args_is_help=True, help="Export a registered adapter: a merged model, or vLLM's LoRA flags.")
app.add_typer(export_app, name="export")

ModelsOpt = typer.Option(None, "--model", help="Registered model to serve (repeatable; default registry.model_name).")


def _loopback_warning(host: str) -> None:
    import os

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
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the registered adapters."""
    import uvicorn

    from loraops import api

    p = params_of(params, set_)
    names = model or [p.registry.model_name]
    _loopback_warning(host)
    fastapi_app, engine, first = api.build(p, names, max_batch=max_batch, queue_size=queue_size, max_tokens_limit=max_tokens_limit)
    where = f"{first.name}/{first.number}'s base" if first else f"model.base {p.model.base!r} (nothing registered yet)"
    typer.echo(f"serving base + {', '.join(names)} (@production, @candidate, /<version>) on http://{host}:{port}/v1; "
               f"base from {where}; device {engine.device}")
    uvicorn.run(fastapi_app, host=host, port=port, log_level="warning")
