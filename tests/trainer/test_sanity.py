"""Sanity of on-policy distillation itself, through the real services on real models:
a student equal to its teacher learns nothing, and a student that is a damaged copy of
the teacher is repaired by OPD (its KL on its own samples falls, its success rises)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.config import LossConfig, TrainConfig
from trainer.train import train


def one_step(env: str, teacher: str, student: Path, out: Path, loss: LossConfig) -> dict:
    """The metrics of one OPD step of two episodes of the student against the teacher."""
    config = TrainConfig(
        student=str(student),
        teacher_urls=[teacher],
        env_url=env,
        max_turns=4,
        max_new_tokens=8,
        episodes_per_step=2,
        steps=1,
        eval_at_start=False,
        eval_splits=["valid_seen"],
        eval_tasks=1,
        checkpoint_every=0,
        diagnose_decisions=0,
        out_dir=str(out),
        loss=loss,
    )
    return train(config, progress=False)[-1]


@pytest.mark.parametrize("divergence", ["sampled", "reverse_kl", "forward_kl"])
def test_a_student_equal_to_its_teacher_gets_zero_advantage_and_zero_gradient(
    serve,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
    tmp_path: Path,
    divergence: str,
) -> None:
    env = serve(create_env_app(EnvSettings()))
    loss = LossConfig(kind="opd", divergence=divergence)  # type: ignore[arg-type]
    same = serve(create_teacher_app(TeacherSettings(model=str(tiny_model_dir), max_wait_ms=2.0)))
    step = one_step(env, same, tiny_model_dir, tmp_path / "same", loss)
    # The teacher's own forward and the student's sampling agree to float precision.
    assert step["tokens"] > 0 and abs(step["kl_estimate"]) < 1e-4
    assert step["grad_norm"] < 1e-5
    # Against another teacher the same step has something to learn.
    other = serve(create_teacher_app(TeacherSettings(model=str(tiny_model_dir_b), max_wait_ms=2.0)))
    step = one_step(env, other, tiny_model_dir, tmp_path / "other", loss)
    assert abs(step["kl_estimate"]) > 0.01 and step["grad_norm"] > 1e-3


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "tiny"
NOISE = 0.17  # relative weight noise that about halves the shipped teacher's success


def damaged_copy(teacher: Path, out: Path, scale: float, seed: int = 0) -> Path:
    """The teacher with Gaussian noise on every matrix, ``scale`` times the matrix's std."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import save_model

    model = AutoModelForCausalLM.from_pretrained(teacher)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.std())
    folder = save_model(model, AutoTokenizer.from_pretrained(teacher), out)
    shutil.copy(teacher / "agent.json", folder / "agent.json")
    return folder


def test_opd_repairs_a_damaged_copy_of_its_teacher(serve, tmp_path: Path) -> None:
    """The damaged student's KL to the teacher on its own samples falls and its success
    rises: the trainer can improve a student at all."""
    teacher = SHIPPED / "teacher"
    student = damaged_copy(teacher, tmp_path / "damaged", NOISE)
    env = serve(create_env_app(EnvSettings()))
    url = serve(create_teacher_app(TeacherSettings(model=str(teacher), max_wait_ms=2.0)))
    config = TrainConfig(
        student=str(student),
        teacher_urls=[url],
        env_url=env,
        history=None,
        show_admissible=False,
        max_turns=20,
        max_new_tokens=24,
        episodes_per_step=16,
        steps=6,
        lr=2e-4,
        eval_splits=["valid_seen"],
        eval_tasks=40,
        checkpoint_every=0,
        diagnose_decisions=0,
        out_dir=str(tmp_path / "run"),
        loss=LossConfig(kind="opd"),
    )
    rows = train(config, progress=False)
    kl = [row["kl_estimate"] for row in rows if "kl_estimate" in row]
    before, after = rows[0]["eval_valid_seen_success"], rows[-1]["eval_valid_seen_success"]
    print(f"success {before:.3f} -> {after:.3f}; KL {kl}")
    assert 0.25 < before < 0.65  # the damage about halved the teacher's success (~80%)
    assert sum(kl[-2:]) < sum(kl[:2])
    assert after > before


def test_diagnose_finds_the_teacher_closer_to_the_expert_than_its_damaged_copy(
    tmp_path: Path,
) -> None:
    import re

    from typer.testing import CliRunner

    from trainer.cli import app

    student = damaged_copy(SHIPPED / "teacher", tmp_path / "damaged", NOISE)
    args = ["diagnose", "--student", str(student), "--teacher", str(SHIPPED / "teacher")]
    result = CliRunner().invoke(app, [*args, "--limit", "10"])
    assert result.exit_code == 0, result.output
    shares = {
        name: [float(x) for x in re.findall(r"([\d.]+)% of \d+", line)]
        for line in result.output.splitlines()
        if (name := line.strip().split(" ", 1)[0]) in ("student", "teacher")
    }
    # In the damaged copy's own states, fresh and right after a failure.
    assert shares["teacher"][0] > shares["student"][0]
    assert shares["teacher"][1] > shares["student"][1]
