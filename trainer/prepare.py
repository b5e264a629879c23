"""`sage-opd prepare`: the tokenizer, the SFT teacher and the warm-started student, cached.

Everything is gathered through the env service and saved as Hugging Face
artifacts under ``artifacts/prepare-<config hash>/``: ``teacher/`` and
``student-init/`` (each with its tokenizer and an ``agent.json`` naming the
history the model was trained with), ``data/`` (the trajectories) and
``summary.json``. With ``data.dagger_rounds``, the SFT teacher then plays train
tasks itself, the expert labels every state it reaches, and it is fine-tuned on
them (DAgger): it learns to recover from its own mistakes, which no hand-made
noise imitates well (such as taking an object that is not there, then trying
again). A second call with the same config finds the summary and
returns at once. The folder is written under a temporary name and renamed at
the end, so an interrupted run leaves no half-built cache behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from client.env import EnvClient
from client.prompts import ChatRenderer
from client.protocol import LABELS, Label
from trainer.config import PrepareConfig, SFTConfig
from trainer.data import (
    ModelPolicy,
    Trajectory,
    agent_sequences,
    corpus,
    gather,
    judge_examples,
    judge_sequences,
    places_of,
)
from trainer.evaluate import play_greedy, summarize, task_count, teacher_forced
from trainer.models import AgentSpec, build_llama, fit_tokenizer, save_model
from trainer.rollout import BatchedGenerator
from trainer.sft import Example, batch_logits, collate, sft
from trainer.timing import timed

log = logging.getLogger(__name__)


@contextmanager
def env_service(url: str | None) -> Iterator[str]:
    """The given env service, or a local one started for the duration."""
    if url:
        yield url
        return
    from trainer.stack import local_service

    with local_service("env", "services.env", env={"SAGE_ENV_LOG_LEVEL": "warning"}) as env:
        yield env.url


def task_ranges(config: PrepareConfig) -> dict[str, list[int]]:
    """Disjoint train task ids for each kind of data, in a fixed order."""
    sizes = [
        ("tokenizer", 0),
        ("expert", config.data.expert_tasks),
        ("recovery", config.data.recovery_tasks),
        ("judge", config.data.judge_tasks),
    ]
    out, start = {}, 0
    for name, n in sizes:
        out[name] = list(range(start, start + n))
        start += n
    return out


def judge_agreement(
    model: Any, renderer: ChatRenderer, examples: list[tuple[list[int], list[int], str]]
) -> dict[str, float]:
    """How often the model's most likely label word is the expert's label, overall and per label."""
    label_ids = [renderer.label_ids()[label] for label in LABELS]
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            batch = collate([Example(p, []) for p, _, _ in chunk], renderer.tokenizer.pad_token_id)
            logits_BLV = batch_logits(model, batch)
            last_B = batch["attention_mask"].sum(dim=1) - 1
            label_logits_B3 = logits_BLV[torch.arange(len(chunk)), last_B][:, label_ids]
            for b, (_, _, label) in enumerate(chunk):
                predicted = LABELS[int(label_logits_B3[b].argmax())]
                totals[label] += 1
                hits[label] += predicted == label
    out = {f"agreement_{label}": hits[label] / totals[label] for label in LABELS if totals[label]}
    out["agreement"] = sum(hits.values()) / max(1, sum(totals.values()))
    out.update({f"count_{label}": float(totals[label]) for label in LABELS})
    return out


def train_model(
    name: str,
    tokenizer: Any,
    shape: Any,
    examples: list[Example],
    sft_config: SFTConfig,
    seed: int,
    progress: bool,
) -> tuple[Any, list[dict[str, float]], float]:
    model = build_llama(tokenizer, shape, seed=seed)
    took: dict[str, float] = {}
    with timed("sft_s", took):
        history = sft(
            model, examples, sft_config, tokenizer.pad_token_id, desc=name, progress=progress
        )
    return model, history, took["sft_s"]


def prepare(
    config: PrepareConfig,
    out_root: Path = Path("artifacts"),
    env_url: str | None = None,
    force: bool = False,
    progress: bool = True,
    evaluate: bool = True,
) -> Path:
    """Build (or find in the cache) the artifacts for ``config``; returns their folder."""
    out = out_root / f"prepare-{config.digest()}"
    if (out / "summary.json").exists() and not force:
        log.info("reusing %s", out)
        return out
    torch.manual_seed(config.seed)
    building = out_root / f".{out.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"config": config.model_dump(mode="json")}
    with env_service(env_url) as url:
        with timed("data_s", timings):
            trajectories = asyncio.run(_gather_all(config, url, progress))
        _save_trajectories(building / "data", trajectories)

        with timed("tokenizer_s", timings):
            everything = [t for group in trajectories.values() for t in group]
            tokenizer = fit_tokenizer(corpus(everything), config.vocab_size)
            renderer = ChatRenderer(tokenizer, show_admissible=config.show_admissible)
            renderer.label_ids()  # refuse now, not after training, if a label is several tokens

        # The student warms up on a subset of the teacher's agent data (first: it may
        # play DAgger rounds for the teacher).
        n = config.data.student_tasks
        student_data = trajectories["expert"][:n] + trajectories["recovery"][:n]
        student_examples = agent_sequences(renderer, student_data, config.history)
        student, student_log, timings["student_sft_s"] = train_model(
            "student sft",
            tokenizer,
            config.student,
            student_examples,
            config.student_sft,
            config.seed + 1,
            progress,
        )

        teacher_agent = agent_sequences(
            renderer, trajectories["expert"] + trajectories["recovery"], config.history
        )
        judge_train, judge_test = _judge_data(renderer, trajectories["judge"], config)
        teacher_examples = teacher_agent + judge_train
        teacher, teacher_log, timings["teacher_sft_s"] = train_model(
            "teacher sft",
            tokenizer,
            config.teacher,
            teacher_examples,
            config.teacher_sft,
            config.seed,
            progress,
        )
        if config.data.dagger_rounds or config.data.student_dagger_rounds:
            with timed("dagger_s", timings):
                played, dagger_log = _dagger(
                    config, teacher, renderer, teacher_examples, url, progress, student
                )
            _save_trajectories(building / "data", played)
            trajectories.update(played)
            summary["dagger"] = _dagger_summary(played, dagger_log)
        # A prepared model also records whether it was taught to think while searching
        # (the expert episodes of `eval --teacher-forced` then carry the same thoughts).
        agent = AgentSpec.of(config)
        save_model(teacher, tokenizer, building / "teacher")
        agent.write(building / "teacher")
        summary["judge"] = judge_agreement(teacher, renderer, judge_test)

        save_model(student, tokenizer, building / "student-init")
        agent.write(building / "student-init")

        summary["teacher"] = _model_summary(teacher, teacher_examples, teacher_log)
        summary["student"] = _model_summary(student, student_examples, student_log)
        if evaluate:
            with timed("eval_s", timings):
                experts = asyncio.run(
                    expert_episodes(url, "valid_unseen", config.eval_tasks, agent)
                )
                for name, model in (("teacher", teacher), ("student", student)):
                    forced = teacher_forced(model, renderer, experts, config.history)
                    summary[name]["valid_unseen_forced"] = asdict(forced)
                    played = asyncio.run(
                        play_greedy(
                            model,
                            tokenizer,
                            url,
                            "valid_unseen",
                            agent,
                            config.eval_tasks,
                            progress,
                        )
                    )
                    summary[name]["valid_unseen"] = summarize("valid_unseen", played).as_dict()
    summary["timings"] = timings
    (building / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)
    return out


MODEL_FOLDERS = ("teacher", "student-init")


def export_models(folder: Path, destination: Path) -> Path:
    """Copy a prepared folder's models and summary (not its data) to ``destination``,
    replacing what was there: the few MB that a demo or a grid can start from."""
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for name in MODEL_FOLDERS:
        shutil.copytree(folder / name, destination / name)
    shutil.copy(folder / "summary.json", destination / "summary.json")
    return destination


def _judge_data(
    renderer: ChatRenderer, trajectories: list[Trajectory], config: PrepareConfig
) -> tuple[list[Example], list[tuple[list[int], list[int], Label]]]:
    """The judge's training examples, and its held-out (prompt, label id, label) triples.

    The first ``judge_holdout`` of the trajectories are held out. With the whole
    history, each trajectory's questions share one sequence (judge_sequences)."""
    holdout = max(1, int(len(trajectories) * config.data.judge_holdout))
    per_episode, seed = config.data.judge_turns_per_episode, config.data.seed
    test = judge_examples(renderer, trajectories[:holdout], config.history, per_episode, seed)
    train_trajectories = trajectories[holdout:]
    if config.history is None:
        return judge_sequences(renderer, train_trajectories, per_episode, seed), test
    judged = judge_examples(renderer, train_trajectories, config.history, per_episode, seed)
    return [Example.prompt_and_target(p, t) for p, t, _ in judged], test


def _dagger(
    config: PrepareConfig,
    teacher: Any,
    renderer: ChatRenderer,
    first_examples: list[Example],
    url: str,
    progress: bool,
    student: Any = None,
) -> tuple[dict[str, list[Trajectory]], list[dict[str, float]]]:
    """DAgger rounds (see DataConfig): a model's own episodes, then the teacher's
    fine-tuning on them. Returns the episodes by who played ("dagger": the teacher,
    "student_dagger": the student) and the fine-tuning's metrics.

    Each round plays the next ``dagger_tasks`` of the expert and recovery tasks with
    the player (greedy) in charge with its chance per step, labels every state with
    the expert's action, and fine-tunes the teacher on those examples plus as many of
    its first examples, drawn at random, so that it keeps what it knew. The teacher
    plays ``dagger_rounds`` rounds, then ``student`` plays ``student_dagger_rounds``.
    """
    data = config.data
    rounds = [("dagger", teacher, data.dagger_noise)] * data.dagger_rounds
    if student is not None:
        rounds += [("student_dagger", student, data.student_dagger_noise)] * (
            data.student_dagger_rounds
        )
    ranges = task_ranges(config)
    pool = ranges["expert"] + ranges["recovery"]
    n = data.dagger_tasks
    rng = random.Random(data.seed)
    episodes: dict[str, list[Trajectory]] = {}
    log_: list[dict[str, float]] = []
    for round_, (who, player, noise) in enumerate(rounds):
        played = asyncio.run(
            _play_own(
                config,
                player,
                renderer,
                pool[round_ * n : (round_ + 1) * n],
                round_,
                noise,
                url,
                progress,
            )
        )
        episodes.setdefault(who, []).extend(played)
        own = agent_sequences(renderer, played, config.history, deviations=True)
        replay = rng.sample(first_examples, min(len(own), len(first_examples)))
        log_ += sft(
            teacher,
            own + replay,
            config.dagger_sft,
            renderer.tokenizer.pad_token_id,
            desc=f"dagger round {round_ + 1}",
            progress=progress,
        )
    return episodes, log_


async def _play_own(
    config: PrepareConfig,
    model: Any,
    renderer: ChatRenderer,
    task_ids: list[int],
    round_: int,
    noise: float,
    url: str,
    progress: bool,
) -> list[Trajectory]:
    async with (
        EnvClient(url, max_connections=64) as env,
        BatchedGenerator(model, renderer.tokenizer, temperature=0.0) as generator,
    ):
        return await gather(
            env,
            task_ids,
            noise,
            config.data.seed + round_,
            agent=AgentSpec.of(config),
            concurrency=64,
            desc=f"dagger round {round_ + 1} episodes",
            progress=progress,
            policy=ModelPolicy(generator, renderer, config.history),
        )


def _dagger_summary(
    played: dict[str, list[Trajectory]], log_: list[dict[str, float]]
) -> dict[str, Any]:
    """Per player: episodes, share won, share of steps off the expert's action; and the
    teacher's fine-tuning steps over all rounds."""
    out: dict[str, Any] = {"steps": len(log_)}
    for who, episodes in played.items():
        steps = [step for episode in episodes for step in episode.steps]
        out[who] = {
            "episodes": len(episodes),
            "won": sum(episode.won for episode in episodes) / max(1, len(episodes)),
            "deviations": sum(s.action != s.expert_action for s in steps) / max(1, len(steps)),
        }
    return out


async def expert_episodes(
    env_url: str, split: str, limit: int | None, agent: AgentSpec
) -> list[Trajectory]:
    """The expert's own episodes on ``split`` (all tasks, or the first ``limit``) in
    ``agent``'s environment and turns, with its thoughts if it thinks."""
    async with EnvClient(env_url, max_connections=64) as env:
        ids = list(range(await task_count(env, agent.env, split, limit)))
        return await gather(env, ids, 0.0, 0, split, agent, progress=False)


async def _gather_all(
    config: PrepareConfig, url: str, progress: bool
) -> dict[str, list[Trajectory]]:
    ranges = task_ranges(config)
    noise = {  # every noisy step is a near miss with probability data.near_miss
        "expert": 0.0,
        "recovery": config.data.recovery_noise,
        "judge": config.data.judge_noise,
    }
    async with EnvClient(url, max_connections=64) as env:
        size = await env.split_size(config.env, "train")
        needed = sum(len(ids) for ids in ranges.values())  # the ranges are disjoint
        if needed > size:
            raise ValueError(
                f"data asks for {needed} distinct train tasks (expert, recovery and judge "
                f"tasks together), but {config.env}'s train split has {size}"
            )
        out: dict[str, list[Trajectory]] = {}
        places: list[str] = []
        for name, level in noise.items():
            out[name] = await gather(
                env,
                ranges[name],
                level,
                config.data.seed,
                agent=AgentSpec.of(config),
                desc=f"{name} episodes",
                progress=progress,
                near_miss=config.data.near_miss,
                places=places,
            )
            if name == "expert" and config.data.near_miss_places:
                places = places_of(out[name])  # the noisy episodes' near misses use them
    return out


def _save_trajectories(folder: Path, trajectories: dict[str, list[Trajectory]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, group in trajectories.items():
        with (folder / f"{name}.jsonl").open("w") as handle:
            for trajectory in group:
                handle.write(json.dumps(asdict(trajectory)) + "\n")


def _model_summary(
    model: Any, examples: list[Example], log_: list[dict[str, float]]
) -> dict[str, Any]:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "steps": len(log_),
        "first_loss": log_[0]["loss"] if log_ else None,
        "last_loss": sum(m["loss"] for m in log_[-10:]) / max(1, len(log_[-10:])),
    }
