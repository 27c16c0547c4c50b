"""The state-score service as a Ray Serve application (replicas behind Serve's HTTP proxy)."""

from __future__ import annotations

from ray import serve

from spo3.score_store.service import create_app
from spo3.score_store.settings import ServiceSettings


def build_app(settings: ServiceSettings, *, num_replicas: int = 1, num_cpus: float = 0.1):
    """A bound Serve application; `serve.run(build_app(s))` deploys it.

    Each replica connects to settings.redis_url itself, so replicas share counts through Redis;
    an embedded Redis (empty URL) would give every replica its own store and is refused.
    """
    if not settings.redis_url:
        raise ValueError("Ray Serve replicas need a shared Redis: pass --redis-url")
    fastapi_app = create_app(settings)

    class ScoreService:
        pass

    # Applied as calls, not as class decorators: mypy keeps a decorated class's own type.
    deployment = serve.deployment(
        name="score-service", num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus}
    )(serve.ingress(fastapi_app)(ScoreService))
    return deployment.bind()
