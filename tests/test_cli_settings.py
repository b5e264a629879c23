"""`sage-opd env serve` and `sage-opd teacher serve` read the SAGE_* settings; flags override."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from trainer.stack import free_port, wait_ready


@contextmanager
def serving(args: list[str], settings: dict[str, str], url: str) -> Iterator[None]:
    """`sage-opd ARGS` with ``settings`` in its environment, until it answers at ``url``."""
    command = [sys.executable, "-m", "trainer.cli", *args]
    process = subprocess.Popen(command, env={**os.environ, **settings})
    try:
        wait_ready(url, process, 60)
        yield
    finally:
        process.kill()
        process.wait()


def test_env_serve_listens_on_the_port_of_its_settings() -> None:
    port = free_port()
    settings = {"SAGE_ENV_PORT": str(port), "SAGE_ENV_LOG_LEVEL": "warning"}
    with serving(["env", "serve"], settings, f"http://127.0.0.1:{port}"):
        listing = httpx.get(f"http://127.0.0.1:{port}/v1/envs").json()
    assert [e["name"] for e in listing["environments"]] == ["household"]


def test_env_serve_flags_override_the_settings() -> None:
    port = free_port()
    settings = {"SAGE_ENV_PORT": "1", "SAGE_ENV_LOG_LEVEL": "warning"}
    with serving(["env", "serve", "--port", str(port)], settings, f"http://127.0.0.1:{port}"):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_teacher_serve_takes_its_port_model_and_dtype_from_its_settings(tiny_model_dir) -> None:
    port = free_port()
    settings = {
        "SAGE_TEACHER_PORT": str(port),
        "SAGE_TEACHER_MODEL": str(tiny_model_dir),
        "SAGE_TEACHER_MODEL_NAME": "tiny",
        "SAGE_TEACHER_DTYPE": "bfloat16",
        "SAGE_TEACHER_DEVICE": "cpu",
        "SAGE_TEACHER_LOG_LEVEL": "warning",
    }
    with serving(["teacher", "serve"], settings, f"http://127.0.0.1:{port}"):
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
    assert [(m["name"], m["dtype"]) for m in models] == [("tiny", "bfloat16")]
