"""The `toyllm` command: the core commands (`toyllm_core.cli`) plus the server's own, `serve` and
`loadtest`. The dependency runs one way: the server imports the core, never the reverse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from toyllm_core.cli import PresetOpt, _fail, _write_json, app
from toyllm_core.weights import missing_checkpoint_hint


@app.command()
def serve(
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory \\[default: "
                                                         "weights/smollm2-135m-instruct (weights/ of the source "
                                                         "checkout, or $TOYLLM_WEIGHTS_DIR); env "
                                                         "TOYLLM_CHECKPOINT].")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address \\[default 127.0.0.1; env TOYLLM_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port \\[default 8000; env TOYLLM_PORT].")] = None,
    preset: PresetOpt = None,
    log_level: str = "info",
) -> None:
    """Start the HTTP server; every setting is also read from TOYLLM_* environment variables."""
    import logging

    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .settings import Settings
    from .shutdown import DrainingServer

    overrides = {k: v for k, v in {"checkpoint": checkpoint, "host": host, "port": port, "preset": preset}.items()
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise _fail("invalid settings: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                      for err in e.errors())) from None
    if settings.preset is None and not settings.checkpoint.is_dir():
        raise _fail(missing_checkpoint_hint(settings.checkpoint))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    state = app.state.toyllm
    # SIGTERM drains first (server/shutdown.py); then uvicorn waits a little for the last responses.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=10)
    DrainingServer(config, state).run()
    if state.load_error is not None:
        raise _fail(f"cannot start: {state.load_error}")


@app.command()
def loadtest(
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent streams.")] = 4,
    requests: Annotated[int, typer.Option(min=1, help="Requests in all.")] = 32,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length in words (~tokens).")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 128,
    policy: Annotated[str, typer.Option(help="Cache policy of each new session.")] = "snapkv",
    budget: int = 64,
    turns: Annotated[int, typer.Option(min=1, help="Requests per session (multi-turn when > 1).")] = 1,
    temperature: float = 0.0,
    ignore_eos: Annotated[bool, typer.Option(help="Every request makes max_new_tokens tokens (no early "
                                                  "end-of-text), so runs are comparable.")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="TOYLLM_API_KEY")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Load-test a running server: TTFT, inter-token and end-to-end latency, tokens/s, errors."""
    import asyncio

    import httpx

    from .loadtest import format_report, run

    try:
        report = asyncio.run(run(url, concurrency, requests, prompt_tokens, max_new_tokens, policy,
                                 None if policy == "full" else budget, turns, temperature, api_key,
                                 ignore_eos=ignore_eos))
    except httpx.HTTPError as e:
        raise _fail(f"{url}: {e.__class__.__name__}: {e or 'cannot reach the server'}") from None
    typer.echo(format_report(report))
    if json_out:
        _write_json(json_out, report)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
