"""`spo3 score-service`: the state-score HTTP service as a process, served by uvicorn or deployed as
a Ray Serve application. What the service does is spo3.score_store.service's (its settings:
`ServiceSettings`); how the process serves it is `ScoreServiceProcess`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from spo3.score_store.settings import ServiceSettings


class ScoreServiceProcess(BaseModel):
    """How the score service's process serves (the service's own settings: ServiceSettings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str = Field(
        "127.0.0.1",
        description="Interface to bind. Keep 127.0.0.1 unless behind a network policy.",
    )
    port: int = Field(8100, ge=1, le=65535, description="TCP port.")
    ray_serve: bool = Field(
        False, description="Deploy as a Ray Serve application instead of plain uvicorn."
    )
    replicas: int = Field(1, ge=1, description="Ray Serve replicas (when served with Ray Serve).")


def serve_scores(process: ScoreServiceProcess, settings: ServiceSettings) -> None:
    """Serve the score service of `settings` until stopped."""
    if process.ray_serve:
        import ray
        from ray import serve

        from spo3.score_store.serve import build_app

        ray.init(include_dashboard=False)
        serve.start(
            http_options={"host": process.host, "port": process.port},
            logging_config={"enable_access_log": False},
        )
        serve.run(build_app(settings, num_replicas=process.replicas), blocking=True)
        return

    import uvicorn

    from spo3.score_store.service import create_app

    uvicorn.run(
        create_app(settings),
        host=process.host,
        port=process.port,
        log_level="warning",
        access_log=False,
    )
