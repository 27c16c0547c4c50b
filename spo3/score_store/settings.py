"""The state-score service's settings: a light module (no FastAPI), so that the CLI can show their
descriptions as its help without importing the service."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from spo3.score_store.score_math import ScoreParams


class ServiceSettings(BaseSettings, ScoreParams):
    """Service settings; every field can also come from the environment as SPO3_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="SPO3_", frozen=True)

    redis_url: str = Field(
        "", description="redis://, rediss:// or unix:// URL; empty starts an embedded Redis."
    )
    run: str = Field("default", description="Run id: the prefix of every Redis key of this run.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token required by mutating routes."
    )
    success_threshold: float = Field(
        1.0, ge=0, le=1, description="A leaf with success >= this counts as a success."
    )
    leaf_ttl_s: int = Field(
        7 * 24 * 3600, ge=0, description="How long leaf ids are remembered (0 = forever)."
    )

    @property
    def score_params(self) -> ScoreParams:
        return ScoreParams.model_validate(self.model_dump(include=set(ScoreParams.model_fields)))
