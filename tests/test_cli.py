"""The sage-opd command line and `python -m services.env`, against real services."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from services.env.app import create_app
from services.env.settings import EnvSettings
from trainer.cli import app
from trainer.stack import local_service


def test_env_play_reports_the_experts_success(serve) -> None:  # noqa: ANN001
    url = serve(create_app(EnvSettings()))
    result = CliRunner().invoke(
        app,
        [
            "env",
            "play",
            "--url",
            url,
            "--policy",
            "expert",
            "--split",
            "valid_seen",
            "--limit",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "expert policy on household/valid_seen: success 100.0% over 6 tasks" in result.output


def test_env_play_refuses_an_unknown_policy(serve) -> None:  # noqa: ANN001
    url = serve(create_app(EnvSettings()))
    result = CliRunner().invoke(app, ["env", "play", "--url", url, "--policy", "greedy"])
    assert result.exit_code != 0 and "expert or random" in result.output


def test_python_m_services_env_serves_on_loopback() -> None:
    with local_service("env", "services.env", env={"SAGE_ENV_LOG_LEVEL": "warning"}) as env:
        assert env.url.startswith("http://127.0.0.1:")
        listing = httpx.get(f"{env.url}/v1/envs").json()
    assert listing["environments"][0]["name"] == "household"


def test_python_m_services_teacher_serves_a_model_on_loopback(tiny_model_dir) -> None:  # noqa: ANN001
    args = ["--model", str(tiny_model_dir), "--model-name", "tiny"]
    quiet = {"SAGE_TEACHER_LOG_LEVEL": "warning"}
    with local_service("teacher", "services.teacher", args=args, env=quiet) as teacher:
        assert teacher.url.startswith("http://127.0.0.1:")
        models = httpx.get(f"{teacher.url}/v1/models").json()["models"]
    assert models[0]["name"] == "tiny" and models[0]["active"]
