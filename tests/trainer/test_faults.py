"""Faults during a run: services that die and come back, a generator stopped mid-batch,
a trainer killed while it writes, and runs that must come out the same when repeated.

Every service here is real (uvicorn on loopback, in process or as a subprocess); faults
are made the way they happen: a process killed, a session gone, a line torn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.train
from client.env import EnvClient
from client.http import RetryPolicy
from client.prompts import ChatRenderer
from client.protocol import StepResult
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.http import running_server
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from tests.trainer.test_train import rows, small_config
from trainer.checkpoints import METRICS_FILE, checkpoint_dirs
from trainer.models import AgentSpec
from trainer.rollout import BatchedGenerator, run_episodes
from trainer.stack import free_port, stop_with_parent, wait_ready
from trainer.train import Trainer, train


@pytest.fixture
def teacher_url(serve, tiny_model_dir_b: Path) -> str:
    return serve(create_teacher_app(TeacherSettings(model=str(tiny_model_dir_b), max_wait_ms=2.0)))


@pytest.fixture
def stack(serve, teacher_url: str) -> dict[str, str]:
    return {"env": serve(create_env_app(EnvSettings())), "teacher": teacher_url}


def tiny(model_dir: Path) -> tuple:
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(
        model_dir
    ).eval()


async def finishes(coroutine, within_s: float):
    """Await ``coroutine`` in a task; fail the test (not hang it) if it is not done in time."""
    task = asyncio.ensure_future(coroutine)
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=10)
        pytest.fail(f"still running after {within_s:.0f}s")
    return task.result()


# ----------------------------------------------------------------------------- the generator


async def test_the_generator_stops_when_cancelled_just_as_an_episode_ends(
    tiny_model_dir: Path,
) -> None:
    tokenizer, model = tiny(tiny_model_dir)

    async def play() -> asyncio.Task:
        async with BatchedGenerator(model, tokenizer, gather_s=60.0) as generator:
            async with generator.episode("a"), generator.episode("b"):
                asking = asyncio.create_task(generator.generate([1, 2, 3], key="a"))
                await asyncio.sleep(0.2)  # the worker waits for b's prompt (up to gather_s)
            # The episodes' ends wake the worker in the same turn of the loop as the exit
            # cancels it: the cancellation must not be lost (asyncio.wait_for's race).
        return asking

    asking = await finishes(play(), within_s=10)
    await asyncio.wait({asking}, timeout=5)
    # The prompt no batch took fails at once instead of after answer_timeout_s.
    assert asking.done() and isinstance(asking.exception(), RuntimeError)


async def test_an_episodes_samples_do_not_depend_on_the_episodes_batched_with_it(
    serve,
    tiny_model_dir: Path,
) -> None:
    url = serve(create_env_app(EnvSettings()))
    tokenizer, model = tiny(tiny_model_dir)
    played = []
    for task_ids in ([5], [3, 5, 7], [7, 5]):
        async with (
            EnvClient(url) as env,
            BatchedGenerator(model, tokenizer, max_new_tokens=8, seed=11) as generator,
        ):
            episodes = await run_episodes(
                env, generator, ChatRenderer(tokenizer), "train", task_ids, AgentSpec(max_turns=3)
            )
        played.append(next(e for e in episodes if e.task_id == 5))
    alone = [turn.response_ids for turn in played[0].turns]
    for batched in played[1:]:
        assert [turn.response_ids for turn in batched.turns] == alone


# ----------------------------------------------------------------------------- the client


async def test_a_call_waits_for_a_service_that_comes_up_eight_seconds_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    stop = threading.Event()

    def start_late() -> None:
        time.sleep(8.0)
        with running_server(create_env_app(EnvSettings()), port=port):
            stop.wait(60)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="client.http"):
            async with EnvClient(f"http://127.0.0.1:{port}") as client:  # the default policy
                listing = await client.environments()
    finally:
        stop.set()
        thread.join(10)
    assert listing.environments[0].name == "household"
    assert 8.0 <= time.monotonic() - start < 30
    assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records)


def test_connection_failures_give_up_after_the_time_budget() -> None:
    async def call() -> None:
        retry = RetryPolicy(initial_wait_s=0.05, max_wait_s=0.2, max_total_s=1.5)
        async with EnvClient(f"http://127.0.0.1:{free_port()}", retry=retry) as client:
            await client.environments()

    start = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        asyncio.run(call())
    assert 1.3 <= time.monotonic() - start < 5


# ----------------------------------------------------------------------------- lost episodes


async def test_an_episode_whose_session_is_gone_is_dropped_and_the_step_goes_on(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost: list[str] = []

    class LosingEnv(EnvClient):
        """Closes the first session stepped in training, as a restarted service forgets it."""

        async def step(self, session_id: str, action: str) -> StepResult:
            if not lost:
                lost.append(session_id)
                await self.close_session(session_id)
            return await super().step(session_id, action)

    monkeypatch.setattr(trainer.train, "EnvClient", LosingEnv)
    config = small_config(stack, tiny_model_dir, tmp_path / "run", steps=2, eval_tasks=1)
    logged = await finishes(Trainer(config, progress=False).run(), within_s=120)
    assert lost and [row["step"] for row in logged] == [0, 1, 2]
    assert [row["episodes_dropped"] for row in logged[1:]] == [1, 0]
    assert [row["episodes_total"] for row in logged[1:]] == [1, 3]


class RestartableEnv:
    """The env service as a process on a fixed port, to be killed and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "services.env", "--port", str(self.port)]
        quiet = {**os.environ, "SAGE_ENV_LOG_LEVEL": "warning"}
        return subprocess.Popen(command, env=quiet, preexec_fn=stop_with_parent)

    def wait_ready(self) -> None:
        wait_ready(self.url, self.process, 60)

    def kill_and_restart(self) -> None:
        """SIGKILL the service; start a new one (no sessions), without waiting for it: it
        refuses connections until it is up (a second or so)."""
        self.process.kill()
        self.process.wait()
        self.process = self._start()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def restartable_env() -> Iterator[RestartableEnv]:
    env = RestartableEnv()
    try:
        env.wait_ready()
        yield env
    finally:
        env.stop()


async def test_the_env_service_killed_and_restarted_mid_collection_costs_episodes_not_steps(
    restartable_env: RestartableEnv,
    teacher_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed: list[str] = []

    class KillingEnv(EnvClient):
        """Kills the env service at the first step of training, then goes on as usual."""

        async def step(self, session_id: str, action: str) -> StepResult:
            if not killed:
                killed.append(session_id)
                restartable_env.kill_and_restart()
            return await super().step(session_id, action)

    monkeypatch.setattr(trainer.train, "EnvClient", KillingEnv)
    stack = {"env": restartable_env.url, "teacher": teacher_url}
    config = small_config(stack, tiny_model_dir, tmp_path / "run", steps=2, eval_tasks=1)
    start = time.monotonic()
    logged = await finishes(Trainer(config, progress=False).run(), within_s=120)
    assert killed and [row["step"] for row in logged] == [0, 1, 2]  # no step lost
    # Both episodes of step 1 had sessions in the killed service: that step was collected
    # again, and says what it lost.
    assert logged[1]["episodes_dropped"] == 2 and logged[1]["episodes_total"] == 2
    assert logged[2]["episodes_dropped"] == 0
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------- metrics and resume


def test_a_torn_last_metrics_line_is_dropped_on_resume(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    config = small_config(stack, tiny_model_dir, out, steps=1, eval_tasks=1)
    train(config, progress=False)
    with (out / METRICS_FILE).open("a") as handle:
        handle.write('{"step": 2, "loss": 0.12')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        train(config.model_copy(update={"steps": 2}), progress=False)
    assert [row["step"] for row in rows(out)] == [0, 1, 2]
    assert any("metrics" in r.getMessage() for r in caplog.records)


KILLED_IN_CHECKPOINT = """
import os, signal, sys
import torch
from trainer.config import TrainConfig, load_config
from trainer.train import train

save = torch.save

def dying_save(obj, path, *args, **kwargs):
    if ".building-000004" in str(path):  # the step-4 checkpoint, half written
        with open(path, "wb") as handle:
            handle.write(b"torn")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path, *args, **kwargs)

torch.save = dying_save
train(load_config(TrainConfig, sys.argv[1]), progress=False)
"""


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for a, b in zip(got, expected, strict=True):
        a, b = comparable(a), comparable(b)
        assert sorted(a) == sorted(b), a["step"]
        for key, value in b.items():
            if isinstance(value, float) and not math.isnan(value):
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)
            else:
                assert a[key] == value, (a["step"], key)


def test_a_run_killed_while_writing_a_checkpoint_resumes_and_logs_what_an_unbroken_run_does(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    def config_for(name: str):
        return small_config(
            stack, tiny_model_dir, tmp_path / name, steps=4, checkpoint_every=2, eval_tasks=2
        )

    unbroken = config_for("unbroken")
    train(unbroken, progress=False)

    broken = config_for("broken")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken.model_dump(mode="json")))
    process = subprocess.run(
        [sys.executable, "-c", KILLED_IN_CHECKPOINT, str(path)],
        capture_output=True,
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    out = Path(broken.out_dir)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000002"]
    # The step's row was logged before its checkpoint was begun.
    assert [row["step"] for row in rows(out)] == [0, 1, 2, 3, 4]

    resumed = train(broken, progress=False)
    assert [row["step"] for row in resumed] == [3, 4]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000002", "step-000004"]
    assert_same_rows(rows(out), rows(Path(unbroken.out_dir)))


# ----------------------------------------------------------------------------- the contract


async def test_a_boolean_seed_is_refused(serve) -> None:
    url = serve(create_env_app(EnvSettings()))
    async with httpx.AsyncClient(base_url=url) as http:
        refused = [await http.post("/v1/sessions", json={"seed": flag}) for flag in (False, True)]
        accepted = await http.post("/v1/sessions", json={"seed": 3})
    assert [r.status_code for r in refused] == [422, 422]
    assert all(r.json()["code"] == "invalid_request" for r in refused)
    assert accepted.status_code == 201
    assert json.loads(accepted.text)["task"]["task_id"] == 0
