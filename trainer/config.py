"""Run configs: pydantic models read from YAML, with `--set a.b=value` overrides.

Every choice of a run is a field with its default next to it; unknown keys are
refused, so a misspelt option fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

C = TypeVar("C", bound=BaseModel)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaShape(Frozen):
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_positions: int = 2048


class SFTConfig(Frozen):
    epochs: float = 1.0  # passes over the examples (fractions allowed)
    batch_tokens: int = 4096  # padded tokens per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


class DataConfig(Frozen):
    """What prepare gathers through the env service (train split only)."""

    expert_tasks: int = 1500  # expert episodes for the teacher
    recovery_tasks: int = 1500  # noisy episodes, each state labelled with the expert's action
    recovery_noise: float = 0.3  # chance of a random admissible action per step
    judge_tasks: int = 1500  # noisy episodes whose turns become judge examples
    judge_noise: float = 0.5
    judge_holdout: float = 0.1  # share of judge examples kept out of training
    student_tasks: int = 40  # expert episodes for the student's warm start
    seed: int = 0


class PrepareConfig(Frozen):
    """`sage-opd prepare`: the tokenizer, the teacher and the student's warm start."""

    env: str = "household"
    history: int | None = 1  # turns of history in every prompt (None: the whole episode)
    max_turns: int = 30
    vocab_size: int = 2048
    tokenizer_tasks: int = 600  # train tasks whose text fits the tokenizer
    teacher: LlamaShape = LlamaShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
    student: LlamaShape = LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384)
    data: DataConfig = DataConfig()
    teacher_sft: SFTConfig = SFTConfig(epochs=2.0)
    student_sft: SFTConfig = SFTConfig(epochs=3.0, lr=2e-3)
    eval_tasks: int | None = None  # None: every task of each eval split
    seed: int = 0

    def digest(self) -> str:
        """A short hash of every field: the cache key of prepared artifacts."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys from "a.b=value" strings; values are read as YAML (3, 0.5, true, null)."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not of the form key.path=value")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(model: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML; None: all defaults), apply overrides, validate as ``model``."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config is a mapping of fields")
        data = loaded or {}
    return model.model_validate(apply_overrides(data, overrides or []))
