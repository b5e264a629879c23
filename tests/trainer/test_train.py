"""The trainer end to end on loopback: real env and teacher services, tiny real models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.teacher import TeacherClient
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.checkpoints import METRICS_FILE, checkpoint_dirs
from trainer.config import LlamaShape, LossConfig, TrainConfig
from trainer.models import AgentSpec, build_llama, fit_tokenizer, save_model
from trainer.supervision import CrossTokenizerDivergence
from trainer.train import Trainer, train

TOKEN = "train-test-token"


@pytest.fixture
def stack(serve, tiny_model_dir: Path, tiny_model_dir_b: Path) -> dict[str, str]:
    """An env service and a teacher service serving tiny-b (tiny is the student)."""
    teacher = TeacherSettings(
        model=str(tiny_model_dir_b),
        model_name="tiny-b",
        admin_token=TOKEN,
        allowed_roots=[str(tiny_model_dir.parent)],
        max_wait_ms=2.0,
    )
    return {
        "env": serve(create_env_app(EnvSettings())),
        "teacher": serve(create_teacher_app(teacher)),
    }


def small_config(stack: dict[str, str], student: Path, out: Path, **changes) -> TrainConfig:
    values = {
        "student": str(student),
        "teacher_urls": [stack["teacher"]],
        "env_url": stack["env"],
        "max_turns": 3,
        "max_new_tokens": 6,
        "episodes_per_step": 2,
        "steps": 2,
        "lr": 1e-3,
        "eval_splits": ["valid_seen"],
        "eval_tasks": 2,
        "checkpoint_every": 1,
        "out_dir": str(out),
    }
    values.update(changes)
    return TrainConfig(**values)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("kind", ["opd", "sage"])
def test_two_steps_train_checkpoint_and_resume_at_the_next_step(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / kind
    # A prepared student's agent.json: what the run does not set (that it was taught to
    # think) passes on to the checkpoints, what it sets (the rendering) is the run's.
    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    (student / "agent.json").write_text(json.dumps({"thoughts": True, "max_turns": 30}))
    config = small_config(stack, student, out, loss=LossConfig(kind=kind))
    logged = train(config, progress=False)
    assert [row["step"] for row in logged] == [0, 1, 2]
    for row in logged[1:]:
        assert row["tokens"] > 0 and row["loss"] == row["loss"]  # trained, not NaN
        assert row["teacher_model"] == "tiny-b" and row["teacher_tokens"] > 0
        assert row["label_skip"] + row["label_weak"] + row["label_strong"] == pytest.approx(1)
        if not row["skipped"]:
            assert row["grad_norm"] > 0
    assert "eval_valid_seen_success" in logged[0] and "eval_valid_seen_success" in logged[-1]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000001", "step-000002"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    weights_before = (checkpoint_dirs(out)[-1] / "model.safetensors").read_bytes()
    assert weights_before != (tiny_model_dir / "model.safetensors").read_bytes()
    # `sage-opd eval --model <checkpoint>` renders prompts as the run did.
    assert AgentSpec.read(checkpoint_dirs(out)[-1]) == AgentSpec(
        history=config.history,
        show_admissible=config.show_admissible,
        max_turns=3,
        env="household",
        thoughts=True,
    )

    # A new run in the same folder with more steps resumes after step 2.
    resumed = train(config.model_copy(update={"steps": 3}), progress=False)
    assert [row["step"] for row in resumed] == [3]
    assert [row["step"] for row in rows(out)] == [0, 1, 2, 3]
    assert resumed[0]["episodes_total"] == 6


async def test_turns_forced_strong_are_supervised_with_the_teacher_confidence_as_score(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A random model names no admissible action: every turn is forced Strong (i_t = 1)
    # whatever the judge says, so s_t = c_t and normalization makes the mean weight 1.
    config = small_config(stack, tiny_model_dir, tmp_path / "run", steps=1, eval_tasks=1)
    trainer = Trainer(config, progress=False)
    logged = await trainer.run()
    step = logged[-1]
    assert step["forced_strong"] == 1.0 and step["label_strong"] == 1.0
    assert step["skipped"] == 0.0 and step["mean_token_weight"] == pytest.approx(1.0)
    assert 0 < step["mean_turn_score"] <= 1  # s_t = c_t, the teacher's confidence


def test_zero_steps_only_evaluate_the_student(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    logged = train(small_config(stack, tiny_model_dir, tmp_path / "run", steps=0), progress=False)
    assert [row["step"] for row in logged] == [0] and "eval_valid_seen_success" in logged[0]
    assert checkpoint_dirs(tmp_path / "run") == []


def test_a_run_that_left_no_checkpoint_starts_its_metrics_afresh(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS_FILE).write_text('{"step": 0}\n{"step": 1, "stale": true}\n')
    train(small_config(stack, tiny_model_dir, out, steps=1, eval_tasks=1), progress=False)
    assert [(row["step"], "stale" in row) for row in rows(out)] == [(0, False), (1, False)]


def test_off_policy_sft_plays_the_policy_and_never_calls_a_teacher(
    stack: dict[str, str], tiny_model_dir: Path, tiny_model_dir_b: Path, tmp_path: Path
) -> None:
    config = small_config(
        stack,
        tiny_model_dir,
        tmp_path / "run",
        steps=1,
        teacher_urls=["http://127.0.0.1:9"],  # nothing listens: a call would fail the run
        sft_policy=str(tiny_model_dir_b),
        loss=LossConfig(kind="sft"),
    )
    step = train(config, progress=False)[-1]
    assert step["teacher_model"] == tiny_model_dir_b.name and step["teacher_revision"] == "local"
    assert step["teacher_tokens"] > 0  # what the policy forwarded to play
    # A random policy wins nothing, and only won episodes are imitated.
    assert step["train_success"] == 0.0 and step["skipped"] == 1.0


async def test_teacher_swap_mid_run_goes_on_and_the_metrics_show_the_new_revision(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = small_config(stack, tiny_model_dir, tmp_path / "run", steps=3, eval_every=0)
    swapped = {}

    async def swap_after_step_one(row: dict) -> None:
        if row["step"] == 1:
            async with TeacherClient(stack["teacher"], admin_token=TOKEN) as teacher:
                from client.protocol import LoadModelRequest

                info = await teacher.load(
                    LoadModelRequest(name="tiny-a", source=str(tiny_model_dir), activate=True)
                )
                swapped["revision"] = info.revision

    logged = await Trainer(config, progress=False).run(on_step=swap_after_step_one)
    steps = {row["step"]: row for row in logged}
    assert steps[1]["teacher_model"] == "tiny-b"
    assert steps[2]["teacher_model"] == "tiny-a" and steps[3]["teacher_model"] == "tiny-a"
    assert steps[2]["teacher_revision"] == swapped["revision"] != steps[1]["teacher_revision"]


@pytest.fixture(scope="module")
def other_vocabulary_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = ["a completely different corpus of words"] * 20 + ["Verdict: Skip Weak Strong"] * 200
    tokenizer = fit_tokenizer(corpus, vocab_size=400)
    model = build_llama(tokenizer, LlamaShape(hidden=32, layers=1, heads=2, kv_heads=1))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("other") / "other-vocab")


async def test_a_swap_to_another_vocabulary_goes_on_chunk_level_at_the_next_step(
    serve,
    tiny_model_dir: Path,
    other_vocabulary_model: Path,
    tmp_path: Path,
) -> None:
    teacher = TeacherSettings(
        model=str(tiny_model_dir),
        model_name="tiny",
        admin_token=TOKEN,
        allowed_roots=[str(tiny_model_dir.parent), str(other_vocabulary_model.parent)],
    )
    stack = {
        "env": serve(create_env_app(EnvSettings())),
        "teacher": serve(create_teacher_app(teacher)),
    }
    config = small_config(stack, tiny_model_dir, tmp_path / "run", steps=3, checkpoint_every=0)

    async def swap_to_other(row: dict) -> None:
        if row["step"] == 1:
            from client.protocol import LoadModelRequest

            async with TeacherClient(stack["teacher"], admin_token=TOKEN) as client:
                await client.load(
                    LoadModelRequest(
                        name="other", source=str(other_vocabulary_model), activate=True
                    )
                )

    logged = await Trainer(config, progress=False).run(on_step=swap_to_other)
    steps = [row for row in logged if row["step"] > 0]
    assert [row["teacher_model"] for row in steps] == ["tiny", "other", "other"]
    assert [row["teacher_alignments"] for row in steps] == [["tokens"], ["chunks"], ["chunks"]]
    assert all(row["tokens"] > 0 and row["loss"] == row["loss"] for row in steps)
    assert [row["step"] for row in rows(tmp_path / "run")] == [0, 1, 2, 3]


async def test_a_full_divergence_with_another_vocabulary_is_refused_before_the_first_step(
    stack: dict[str, str], other_vocabulary_model: Path, tmp_path: Path
) -> None:
    loss = LossConfig(kind="opd", divergence="forward_kl")
    config = small_config(stack, other_vocabulary_model, tmp_path / "run", loss=loss)
    with pytest.raises(CrossTokenizerDivergence) as caught:
        await Trainer(config, progress=False).run()
    message = str(caught.value)
    assert "divergence sampled" in message and "vocab" in message
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_two_trainer_processes_train_at_once_against_one_teacher(
    stack: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    processes = []
    for name in ("a", "b"):
        config = small_config(stack, tiny_model_dir, tmp_path / name, eval_tasks=1)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        command = [sys.executable, "-m", "trainer.cli", "train", "--config", str(path), "--quiet"]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert b"valid_seen: success" in stdout
    for name in ("a", "b"):
        logged = rows(tmp_path / name)
        assert [row["step"] for row in logged] == [0, 1, 2]
        assert all(row["teacher_model"] == "tiny-b" for row in logged[1:])
