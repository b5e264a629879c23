"""Schemathesis over each service's OpenAPI: generated requests never cause a 500.

503 (session cap, full queue) and 504 (a generated deadline of ~0 s) are the
services' documented answers, not failures; only an internal error counts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings


def fuzz(url: str, max_examples: int) -> str:
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--seed",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert "generated" in done.stdout, done.stdout + done.stderr
    return done.stdout


def test_the_env_service_answers_generated_requests_without_internal_errors(serve) -> None:
    output = fuzz(serve(create_env_app(EnvSettings())), max_examples=40)
    assert "[500]" not in output, output


def test_the_teacher_service_answers_generated_requests_without_internal_errors(
    serve,
    tiny_model_dir: Path,
) -> None:
    settings = TeacherSettings(model=str(tiny_model_dir), admin_token="x")
    output = fuzz(serve(create_teacher_app(settings)), max_examples=30)
    assert "[500]" not in output, output
