"""Settings of the teacher service, read from SAGE_TEACHER_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TeacherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGE_TEACHER_", frozen=True)

    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = Field(8200, ge=0, le=65535)
    log_level: str = "info"

    # The model served from start-up (optional; admin calls can load one later).
    model: str | None = None
    model_name: str = "teacher"
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    backend: str = "transformers"

    # Safety: admin routes need this bearer token (unset: admin routes are refused);
    # models load only from these directories or these hub ids.
    admin_token: str | None = None
    allowed_roots: list[str] = Field(default_factory=list)
    allowed_ids: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False
    max_body_bytes: int = Field(16 << 20, ge=1024)
    # Tokens one request may render to (every sequence, judge branch and prompt, plus
    # the new tokens of completions); more is refused with 413. An episode's branch
    # mask costs memory with the square of its length, so this bounds it too.
    max_request_tokens: int = Field(16_384, ge=16)

    # Micro-batching.
    batching: bool = True
    max_batch_tokens: int = Field(8192, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(256, ge=1)
    default_deadline_s: float = Field(120.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
