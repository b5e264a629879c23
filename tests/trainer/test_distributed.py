"""Data-parallel students under torchrun (2 CPU ranks, gloo): the same update as one process."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from client.env import EnvClient
from client.prompts import ChatRenderer
from client.teacher import TeacherClient
from trainer.checkpoints import checkpoint_dirs
from trainer.config import LossConfig, TrainConfig
from trainer.losses import turn_scores
from trainer.supervision import Supervisor, switches_of
from trainer.train import Trainer
from trainer.update import build_batch

from .ddp_update import main as update_alone
from .test_train import rows, small_config, stack  # noqa: F401  (the fixture)

WORKER = Path(__file__).with_name("ddp_update.py")
BIN = Path(sys.executable).parent


def torchrun(*args: str, timeout_s: float = 240) -> str:
    """``torchrun --nproc-per-node 2 ...`` on loopback; what it printed. A run past
    ``timeout_s`` is killed with its ranks (they share its process group)."""
    rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    command = [str(BIN / "torchrun"), *rendezvous, "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        printed, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        printed, _ = process.communicate()
        raise AssertionError(f"torchrun ran past {timeout_s}s:\n{printed[-3000:]}") from None
    assert process.returncode == 0, printed[-6000:]
    return printed


async def supervised_episodes(config: TrainConfig, count: int) -> tuple[list, ChatRenderer]:
    """``count`` episodes played by the student and supervised by the teacher, as a
    step collects them; and the renderer that turns them into a batch."""
    trainer = Trainer(config, progress=False)
    async with EnvClient(config.env_url) as env, TeacherClient(config.teacher_urls[0]) as teacher:
        supervisor = Supervisor([teacher], config, trainer.tokenizer)
        tasks = [(config.env, t) for t in range(count)]
        episodes, lost = await trainer.collect(env, supervisor, tasks)
    assert not lost and len(episodes) == count
    return episodes, trainer.renderer


async def test_two_ranks_update_the_student_as_one_process_does(
    stack: dict[str, str],  # noqa: F811
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    # SAGE-OPD with normalization, two PPO substeps; a rank's share of sum s differs from
    # the other's, so only the all-reduced denominator gives the one-process update.
    loss = LossConfig(kind="sage", substeps=2)
    config = small_config(stack, tiny_model_dir, tmp_path / "run", loss=loss, max_turns=4)
    episodes, renderer = await supervised_episodes(config, 3)
    shares = [episodes[0::2], episodes[1::2]]
    switches = switches_of(loss)
    denominators = []
    for share in shares:
        batch = build_batch(renderer, share, config)
        s_T = turn_scores(batch.confidence_T, batch.labels, switches)
        denominators.append(float(s_T[batch.turn_N].sum()))
    assert abs(denominators[0] - denominators[1]) > 0.1 * max(denominators)
    # The second batch has one episode: rank 1 has nothing to train and still takes part.
    case = tmp_path / "case.pkl"
    case.write_bytes(
        pickle.dumps(
            {"config": config, "student": str(tiny_model_dir), "batches": [episodes, episodes[:1]]}
        )
    )
    torchrun(str(WORKER), str(case), str(tmp_path / "ranks.pt"))
    update_alone(str(case), str(tmp_path / "alone.pt"))
    ranks, alone = (torch.load(tmp_path / f, weights_only=False) for f in ("ranks.pt", "alone.pt"))
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for two, one in zip(ranks, alone, strict=True):
        assert two["metrics"]["skipped"] == one["metrics"]["skipped"] == 0.0
        for key in ("tokens", "loss", "mean_token_weight", "kl_estimate", "grad_norm"):
            assert abs(two["metrics"][key] - one["metrics"][key]) <= 1e-5 * max(
                1.0, abs(one["metrics"][key])
            ), key
        # Adam moves a weight by about lr (1e-3) whatever its gradient's size, so the sum
        # order of a tiny gradient shows at 1e-6; a wrong update shows at 1e-3.
        for name, value in one["parameters"].items():
            torch.testing.assert_close(two["parameters"][name], value, rtol=1e-4, atol=1e-5)
        # The update moved the weights (equal parameters mean nothing untrained).
        moved = max(float((one["parameters"][n] - p).abs().max()) for n, p in initial.items())
        assert moved > 1e-4


def test_torchrun_trains_with_two_ranks_logs_once_and_resumes(
    stack: dict[str, str],  # noqa: F811
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    config = small_config(
        stack, tiny_model_dir, out, steps=1, episodes_per_step=4, eval_tasks=1, checkpoint_every=1
    )
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    train = ["--no-python", str(BIN / "sage-opd"), "train", "--config", str(config_file)]
    torchrun(*train, "--quiet")
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000001"]
    torchrun(*train, "--quiet", "--set", "steps=2")
    logged = rows(out)
    assert [row["step"] for row in logged] == [0, 1, 2]  # one row a step: rank 0 logs
    # Each step's row counts the episodes of both ranks.
    assert [row["episodes_total"] for row in logged[1:]] == [4, 8]
    assert all(row["tokens"] > 0 for row in logged[1:])
    assert "eval_valid_seen_success" in logged[-1]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000001", "step-000002"]
