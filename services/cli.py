"""`spo3`: the command line of the 3SPO actor-learner system.

Heavy modules (torch, ray, fastapi) are imported inside each command so that `spo3 --help`
answers at once.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="3SPO: state-score-supervised policy optimization for LLM agents, as an actor-learner system.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """3SPO: state-score-supervised policy optimization for LLM agents.

    Run `spo3 COMMAND --help` for the options of a command.
    """


@app.command("score-service")
def score_service(
    host: Annotated[str, typer.Option(help="Interface to bind. Keep 127.0.0.1 unless behind a network policy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8100,
    redis_url: Annotated[Optional[str], typer.Option(
        envvar="SPO3_REDIS_URL",
        help="redis://[:password@]host:port/db, rediss://... or unix:///path. Empty: an embedded Redis (single machine).")] = None,
    run: Annotated[str, typer.Option(envvar="SPO3_RUN", help="Run id; prefixes every Redis key of the run.")] = "default",
    token: Annotated[Optional[str], typer.Option(
        envvar="SPO3_API_TOKEN", help="Bearer token for mutating routes. Unset: a random one is generated and printed.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="lambda(t) = alpha ln t (default 1; the paper's scripts use 50). Env SPO3_ALPHA.")] = None,
    xi: Annotated[Optional[int], typer.Option(help="Truncate a state after xi failures ... (default 10). Env SPO3_XI.")] = None,
    zeta: Annotated[Optional[float], typer.Option(help="... while its success rate is <= zeta (default 0.1). Env SPO3_ZETA.")] = None,
    g_max: Annotated[Optional[int], typer.Option(help="Most branches at one state, n = ceil(g_max S) (default 8). Env SPO3_G_MAX.")] = None,
    omega_k: Annotated[Optional[float], typer.Option(help="Novelty weight decay (default 0.1). Env SPO3_OMEGA_K.")] = None,
    ray_serve: Annotated[bool, typer.Option("--ray-serve", help="Deploy as a Ray Serve application instead of plain uvicorn.")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray-serve).")] = 1,
) -> None:
    """Serve state scores over HTTP: POST /v1/scores, POST /v1/leaves, GET /v1/stats, /metrics."""
    from score_store.service import ServiceSettings

    overrides = {k: v for k, v in dict(alpha=alpha, xi=xi, zeta=zeta, g_max=g_max, omega_k=omega_k,
                                       redis_url=redis_url, run=run).items() if v is not None}
    if not token:
        token = secrets.token_urlsafe(24)
        typer.echo(f"SPO3_API_TOKEN not set; generated token for this process: {token}", err=True)
    settings = ServiceSettings(**overrides, api_token=token)

    if ray_serve:
        import ray
        from ray import serve

        from score_store.serve import build_app

        ray.init(include_dashboard=False)
        serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
        serve.run(build_app(settings, num_replicas=replicas), blocking=True)
        return

    import uvicorn

    from score_store.service import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


@app.command("init-model")
def init_model_cmd(
    out: Annotated[str, typer.Argument(help="Directory to write the model to (Hugging Face format, safetensors).")],
    preset: Annotated[str, typer.Option(help="Size: tiny (~0.15M parameters, tests) or small (~3.5M, demo).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed for the tokenizer corpus and the initial weights.")] = 0,
) -> None:
    """Create a small Qwen2-shaped model and a tokenizer trained locally (no downloads).

    Any local Hugging Face checkpoint (e.g. Qwen2.5-1.5B-Instruct) can be used instead wherever
    a model path is asked for.
    """
    from services.model_init import init_model

    path = init_model(out, preset, seed)
    typer.echo(f"wrote {preset} model to {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
