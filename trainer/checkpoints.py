"""A run's files: metrics.jsonl (one row a step, on disk before the step's checkpoint)
and atomic checkpoints (checkpoints/step-N), from which a run in the same folder resumes.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.models import AgentSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. Unreadable lines at its end (a write cut short by a
    kill) are left out with a warning; an unreadable line before a good one is an error."""
    rows: list[dict[str, Any]] = []
    torn: list[int] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        if torn:
            raise ValueError(f"{path}: line {torn[0]} is not JSON, and rows follow it")
        rows.append(row)
    if torn:
        log.warning("%s: dropping %d torn line(s) at its end: %s", path, len(torn), torn)
    return rows


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    folder = out_dir / "checkpoints"
    return sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
    agent: AgentSpec,
) -> Path:
    """Write checkpoints/step-N atomically (a temporary folder renamed at the end).

    ``agent`` goes to agent.json, as in a prepared model's folder, so that
    `sage-opd eval --model <checkpoint>` renders prompts as the run did.
    """
    folder = out_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    building = folder / f".building-{step:06d}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    agent.write(building)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        **extra,
    }
    torch.save(state, building / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    building.rename(final)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
