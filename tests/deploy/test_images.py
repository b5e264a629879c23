"""The images and the compose stack as files: hadolint, the compose file's promises, the probe."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.probe import main as probe
from trainer.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy").glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_there_is_an_image_for_each_part() -> None:
    names = {path.name.removesuffix(".Dockerfile") for path in DOCKERFILES}
    assert names == {"env", "teacher-cpu", "teacher-vllm", "trainer"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    done = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_takes_a_base_runs_unprivileged_and_says_how_it_is_healthy(
    dockerfile: Path,
) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert lines.index(next(x for x in lines if x.startswith("ARG BASE_IMAGE="))) < lines.index(
        "FROM ${BASE_IMAGE}"
    )
    assert "USER 10001" in lines
    health = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert len(health) == 1
    if dockerfile.name == "trainer.Dockerfile":  # a job, not a server
        assert health == ["HEALTHCHECK NONE"]
    else:
        probe_line = lines[lines.index(health[0]) + 1]
        assert '"services.probe"' in probe_line


def test_the_build_context_leaves_out_tests_runs_and_the_venv() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignored if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything is left out first, then what images need is let in
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "client", "services", "trainer", "configs",
                       "models/tiny"}  # fmt: skip


def test_compose_publishes_on_loopback_and_starts_trainers_after_healthy_services() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        if "healthcheck" in service:
            assert "services.probe" in service["healthcheck"]["test"]
    assert {n for n, s in services.items() if "healthcheck" in s} >= {"env", "teacher"}
    trainer = services["trainer"]
    assert trainer["profiles"] == ["train"] and trainer["restart"] == "no"
    assert trainer["depends_on"] == {
        "env": {"condition": "service_healthy"},
        "teacher": {"condition": "service_healthy"},
    }
    gpu = services["teacher-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_keeps_models_and_runs_on_volumes_and_the_token_out_of_the_file() -> None:
    stack = compose()
    assert set(stack["volumes"]) == {"models", "runs"}
    assert "models:/models" in stack["services"]["teacher"]["volumes"]
    assert "runs:/runs" in stack["services"]["trainer"]["volumes"]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "ADMIN_TOKEN" not in text.replace("# SAGE_TEACHER_ADMIN_TOKEN", "")
    for name in ("teacher", "teacher-gpu"):
        assert "compose.env" in stack["services"][name]["env_file"]
    assert "deploy/compose.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_probe_is_healthy_only_while_the_service_is_ready(
    serve,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = serve(create_env_app(EnvSettings()))
    monkeypatch.setenv("SAGE_ENV_PORT", url.rsplit(":", 1)[1])
    assert probe(["env"]) == 0
    monkeypatch.setenv("SAGE_ENV_PORT", str(free_port()))  # nothing listens there
    assert probe(["env"]) == 1
    assert probe(["neither"]) == 2
