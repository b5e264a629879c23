"""Sanity of on-policy distillation itself, through the real services on real models:
a student equal to its teacher learns nothing, and a student that is a damaged copy of
the teacher is repaired by OPD (its KL on its own samples falls, its success rises)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    serve,  # noqa: ANN001
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
