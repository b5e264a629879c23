"""Settings of the env service, read from SAGE_ENV_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EnvSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGE_ENV_", frozen=True)

    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = Field(8100, ge=0, le=65535)
    environments: str = "household"  # comma-separated names to serve
    max_sessions: int = Field(1024, ge=1)
    session_ttl_s: float = Field(600.0, gt=0)  # an idle session is closed after this
    max_body_bytes: int = Field(1 << 20, ge=1024)
    log_level: str = "info"

    def environment_names(self) -> list[str]:
        return [name.strip() for name in self.environments.split(",") if name.strip()]
