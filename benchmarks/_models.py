"""Teacher models and episodes for the benchmarks: random Llamas on a household tokenizer.

``tiny_teacher`` builds a model once and keeps it in a folder (a temp folder
by default), so later runs load it instead of building it again.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import shutil
import tempfile
from pathlib import Path

import httpx
from transformers.utils import logging as transformers_logging

import trainer.models
from client.prompts import JUDGE_INSTRUCTIONS, SYSTEM_PROMPT
from client.protocol import EpisodeTurn
from trainer.config import LlamaShape
from trainer.models import build_llama, fit_tokenizer, save_model

DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "sage-opd-bench-models"
SIZES = {
    "tiny": LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "teacher": LlamaShape(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768),
}
# For services started as processes: no progress bars, warnings only.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "SAGE_TEACHER_LOG_LEVEL": "warning"}
WORDS = ["go to cabinet 1", "take apple 1 from countertop 1", "look", "open fridge 1"]

transformers_logging.disable_progress_bar()


def household_corpus() -> list[str]:
    """Household observations and actions, the prompts, and the judge's verdict lines."""
    from services.env.household import HouseholdEnvironment

    family = HouseholdEnvironment()
    verdicts = [f"Verdict: {label}" for label in ("Skip", "Weak", "Strong")]
    texts = [SYSTEM_PROMPT, JUDGE_INSTRUCTIONS] * 5 + verdicts * 40
    for task_id in range(60):
        outcome = family.make("train", task_id).reset()
        texts.append(outcome.observation)
        texts.extend(outcome.admissible_actions)
    return texts


def tiny_teacher(folder: Path | None = None, size: str = "tiny") -> Path:
    """A saved random Llama teacher of ``size`` ("tiny", "teacher") under ``folder``.

    The cache is keyed by the size and the code and prompts the tokenizer is fitted with.
    """
    dims = SIZES[size]
    recipe = f"{inspect.getsource(trainer.models)}{SYSTEM_PROMPT}{JUDGE_INSTRUCTIONS}{dims}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = (folder or DEFAULT_FOLDER) / f"{size}-{key}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = fit_tokenizer(household_corpus(), vocab_size=1200)
    model = build_llama(tokenizer, dims, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=path.parent))  # then renamed: atomic
    save_model(model, tokenizer, staging)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def random_episode(tokenizer, turns: int, seed: int = 0) -> tuple[str, list[EpisodeTurn]]:
    """A household-like episode of ``turns`` turns with random actions as the responses."""
    rng = random.Random(seed)
    out = []
    for t in range(turns):
        place = f"cabinet {t % 4 + 1}"
        response = tokenizer.encode(f"Action: {rng.choice(WORDS)}", add_special_tokens=False)
        out.append(
            EpisodeTurn(
                observation=f"You arrive at {place}. The {place} is closed.",
                admissible_actions=WORDS,
                response_ids=[*response, tokenizer.eos_token_id],
                feedback="Nothing happens." if t % 3 == 0 else f"You open the {place}.",
            )
        )
    return "put a clean apple in fridge.", out


def scrape(url: str) -> dict[str, float]:
    """A service's /metrics as {series with labels: value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    lines = (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {series: float(value) for series, value in lines}


def series(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s series that carry all of ``labels`` (0 when none)."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for key, value in metrics.items()
        if key.split("{")[0] == name and all(w in key for w in wanted)
    )
