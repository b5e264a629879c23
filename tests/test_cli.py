"""The sage-opd command line and `python -m services.env`, against real services."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from services.env.app import create_app
from services.env.settings import EnvSettings
from trainer.cli import app
from trainer.stack import local_service


def test_env_play_reports_the_experts_success(serve) -> None:
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


def test_env_play_refuses_an_unknown_policy(serve) -> None:
    url = serve(create_app(EnvSettings()))
    result = CliRunner().invoke(app, ["env", "play", "--url", url, "--policy", "greedy"])
    assert result.exit_code != 0 and "expert or random" in result.output


def test_python_m_services_env_serves_on_loopback() -> None:
    with local_service("env", "services.env", env={"SAGE_ENV_LOG_LEVEL": "warning"}) as env:
        assert env.url.startswith("http://127.0.0.1:")
        listing = httpx.get(f"{env.url}/v1/envs").json()
    assert listing["environments"][0]["name"] == "household"


def test_python_m_services_teacher_serves_a_model_on_loopback(tiny_model_dir) -> None:
    args = ["--model", str(tiny_model_dir), "--model-name", "tiny"]
    quiet = {"SAGE_TEACHER_LOG_LEVEL": "warning"}
    with local_service("teacher", "services.teacher", args=args, env=quiet) as teacher:
        assert teacher.url.startswith("http://127.0.0.1:")
        models = httpx.get(f"{teacher.url}/v1/models").json()["models"]
    assert models[0]["name"] == "tiny" and models[0]["active"]


def test_up_starts_env_and_teacher_on_loopback_and_stops_them_on_interrupt(tiny_model_dir) -> None:
    import signal
    import subprocess
    import sys
    import time

    from trainer.stack import free_port

    env_port, teacher_port = free_port(), free_port()
    command = [sys.executable, "-m", "trainer.cli", "up", "--teacher", str(tiny_model_dir)]
    command += ["--env-port", str(env_port), "--teacher-port", str(teacher_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while len(lines) < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if "ready at" in line:
                lines.append(line)
        assert any(f"127.0.0.1:{env_port}" in line for line in lines)
        assert any(f"127.0.0.1:{teacher_port}" in line for line in lines)
        for port in (env_port, teacher_port):
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    for port in (env_port, teacher_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            raise AssertionError(f"port {port} still serves after up stopped")
        except httpx.ConnectError:
            pass


def test_a_service_started_by_a_killed_process_stops_too() -> None:
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from trainer.stack import local_service\n"
        "with local_service('env', 'services.env') as s:\n"
        "    print(s.url, flush=True)\n"
        "    import time; time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        while not url.startswith("http://"):  # the service shares the parent's stdout
            line = parent.stdout.readline()
            assert line, "the parent exited before its service was ready"
            url = line.strip()
        assert httpx.get(f"{url}/readyz").status_code == 200
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/readyz", timeout=1)
            except httpx.ConnectError:  # nothing listens any more
                return
            except httpx.TransportError:  # shutting down: still bound, not answering
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} still serves after the process that started it was killed")
    finally:
        parent.kill()


def test_demo_trains_the_shipped_student_against_the_shipped_teacher(tmp_path) -> None:
    settings = ["steps=1", "episodes_per_step=2", "eval_tasks=3", "max_turns=4"]
    args = ["demo", "--out", str(tmp_path)] + [x for s in settings for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher, for reference: valid_unseen: success" in result.output
    assert "valid_unseen: success" in result.output and "(step 0) -> " in result.output
    assert len(list(tmp_path.glob("*/checkpoints/step-000001"))) == 1


def test_demo_without_models_says_how_to_make_them(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--models", str(tmp_path / "none")])
    assert result.exit_code != 0 and "sage-opd prepare" in result.output
