"""`sage-opd train`: multi-turn OPD and SAGE-OPD through the env and teacher services.

``Trainer.run`` is the loop; each step:
1. collect: ``episodes_per_step`` train tasks (of every environment the run trains
   in) are played by the student at once (trainer/rollout.py); each episode, as soon
   as it ends, goes to its teacher (trainer/supervision.py) while the other episodes
   still act.
2. train: the episodes become one batch of trained tokens and the loss of
   trainer/losses.py is applied for ``loss.substeps`` optimizer steps
   (trainer/update.py).
3. log: one JSON line per step and TensorBoard scalars; greedy evaluation every
   ``eval_every`` steps; then an atomic checkpoint every ``checkpoint_every`` steps,
   from which a new run in the same folder resumes (trainer/checkpoints.py).

An episode the env service loses (its session gone after a restart, the service out
of reach) is dropped and counted in the step's ``episodes_dropped``; the step goes on
with the others. A step that loses every episode is collected again, up to
COLLECT_ATTEMPTS times, then the run stops with EpisodesLost.

The teachers' models and revisions are logged per step, and which teacher supervised
each episode. A teacher that switches to a model of another family goes on
supervising chunk-level from its first answer (trainer/alignment.py).
Under torchrun each rank plays a share of the step's tasks (trainer/distributed.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from client.env import EnvClient
from client.fingerprint import (
    check_same_vocabulary,
    fingerprint_of,
)
from client.http import ServiceCallError
from client.prompts import ChatRenderer
from client.protocol import ModelRef
from client.teacher import TeacherClient
from trainer.checkpoints import (
    METRICS_FILE,
    STATE_FILE,
    checkpoint_dirs,
    read_metrics,
    save_checkpoint,
)
from trainer.config import TrainConfig
from trainer.diagnostics import decision_stats
from trainer.distributed import SINGLE, DataParallel, data_parallel, leave, wrap
from trainer.episodes import play_many
from trainer.evaluate import play_greedy, summarize
from trainer.models import AgentSpec
from trainer.rollout import BatchedGenerator, EpisodeRecord, run_episode
from trainer.sft import make_optimizer, warmup_cosine
from trainer.supervision import (
    SupervisedEpisode,
    Supervisor,
    label_metrics,
)
from trainer.timing import timed
from trainer.update import Batch, build_batch, train_on_batch

log = logging.getLogger(__name__)

COLLECT_ATTEMPTS = 3  # tries at collecting a step whose every episode was dropped


async def play_split(
    model: Any,
    tokenizer: Any,
    env_url: str,
    split: str,
    config: TrainConfig,
    agent: AgentSpec | None = None,
) -> list[EpisodeRecord]:
    """Greedy episodes of ``model`` on ``split`` under the train config's rendering, turn
    limit and task selection (in ``agent``'s environment; None: the config's): what
    each evaluation plays."""
    return await play_greedy(
        model,
        tokenizer,
        env_url,
        split,
        agent or AgentSpec.of(config),
        config.eval_tasks,
        progress=False,
    )


class EpisodesLost(RuntimeError):
    """Every episode of a step was dropped, in each of COLLECT_ATTEMPTS collections."""


def episode_lost(exc: BaseException) -> bool:
    """Whether ``exc``, raised while an episode talked to the env service, means the
    service lost the episode (it restarted, or could not be reached): its session is
    gone (404), the service failed (5xx), or the connection did."""
    if isinstance(exc, ServiceCallError):
        return exc.status >= 500 or (exc.status == 404 and exc.error.code == "session_not_found")
    return isinstance(exc, httpx.TransportError)


# ----------------------------------------------------------------------------- the run


def pick_device(name: str, data: DataParallel = SINGLE) -> torch.device:
    """The device ``name`` says; "auto": this rank's GPU where there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", data.local_rank)
        return torch.device("cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.data = data_parallel()  # rank 0 of 1 unless started by torchrun
        self.progress = progress and self.data.main
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(config.device, self.data)
        latest = checkpoint_dirs(self.out_dir)
        source = str(latest[-1]) if latest else config.student
        dtype = getattr(torch, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(self.device)
        # A checkpoint keeps what its source's agent.json says (e.g. that it thinks while
        # searching), under this run's own rendering settings.
        self.agent = AgentSpec.of(config, base=AgentSpec.read(source))
        self.agents = {
            name: self.agent.model_copy(update={"env": name}) for name in config.environments()
        }
        self.renderer = ChatRenderer(self.tokenizer, show_admissible=config.show_admissible)
        # Who plays the episodes: the student itself, or (off-policy SFT) another model.
        self.policy = self.model
        if config.loss.kind == "sft":
            assert config.sft_policy is not None
            policy_tokenizer = AutoTokenizer.from_pretrained(config.sft_policy)
            check_same_vocabulary(fingerprint_of(self.tokenizer), fingerprint_of(policy_tokenizer))
            self.policy = AutoModelForCausalLM.from_pretrained(config.sft_policy, dtype=dtype)
            self.policy.to(self.device).eval()
        self.trained = wrap(self.model, self.data)  # DDP over several ranks
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(
                step, config.steps, config.warmup_steps, config.min_lr_ratio
            ),
        )
        self.step = 0  # steps done
        self.teacher_tokens = 0
        self.episodes_seen = 0
        if latest:
            state = torch.load(latest[-1] / STATE_FILE, weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            self.step = state["step"]
            self.teacher_tokens = state.get("teacher_tokens", 0)
            self.episodes_seen = state.get("episodes_seen", 0)
            log.info("resuming from %s at step %d", latest[-1], self.step + 1)
        self.writer = None
        if self.data.main:  # rank 0 writes the run's files
            # A fresh start (step 0): what an attempt that left no checkpoint logged is void.
            self._truncate_metrics(self.step if latest else -1)
            (self.out_dir / "config.json").write_text(config.model_dump_json(indent=2))
            self.writer = _tensorboard(self.out_dir / "tensorboard")

    # --- bookkeeping

    def _truncate_metrics(self, step: int) -> None:
        """Forget metrics logged after the checkpoint a resume starts from, and a torn
        last line (a kill in the middle of a write)."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        kept = [row for row in read_metrics(path) if row["step"] <= step]
        rewritten = path.with_suffix(".rewriting")
        rewritten.write_text("".join(json.dumps(row) + "\n" for row in kept))
        rewritten.replace(path)  # atomic: a kill now leaves the old file or the new one

    def log_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append the row to metrics.jsonl, on disk (fsync) before this returns it."""
        with (self.out_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()
        return metrics

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            {"teacher_tokens": self.teacher_tokens, "episodes_seen": self.episodes_seen},
            self.config.keep_checkpoints,
            self.agent,
        )

    # --- phases

    def task_ids(self, step: int, split_sizes: dict[str, int]) -> list[tuple[str, int]]:
        """The step's tasks, over all ranks: (environment, task id). The episodes are
        shared out evenly over the environments (the first ones get the remainder),
        each one's tasks drawn at random from its train split."""
        rng = random.Random(f"{self.config.seed}:{step}")
        share, extra = divmod(self.config.episodes_per_step, len(split_sizes))
        tasks = []
        for i, (name, size) in enumerate(split_sizes.items()):
            count = min(share + (i < extra), size)
            tasks.extend((name, t) for t in rng.sample(range(size), count))
        return tasks

    async def collect(
        self, env: EnvClient, supervisor: Supervisor, tasks: list[tuple[str, int]]
    ) -> tuple[list[SupervisedEpisode], list[BaseException]]:
        """Play and supervise the tasks' episodes: those kept, in task order, and what
        lost the others (see episode_lost: they are dropped, not fatal)."""
        config = self.config
        self.model.eval()
        lost: list[BaseException] = []
        async with BatchedGenerator(
            self.policy,
            self.tokenizer,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed * 100_003 + self.step,
        ) as generator:

            async def one(task: tuple[str, int]) -> SupervisedEpisode | None:
                name, task_id = task
                try:
                    record = await run_episode(
                        env,
                        generator,
                        self.renderer,
                        config.train_split,
                        task_id,
                        self.agents[name],
                        config.end_after_failures,
                    )
                except (ServiceCallError, httpx.HTTPError) as exc:
                    if not episode_lost(exc):
                        raise
                    log.warning("episode of task %d dropped: %s", task_id, exc)
                    lost.append(exc)
                    return None
                if config.loss.kind == "sft":
                    return self.imitation(record)
                return await supervisor.supervise(record)

            played = await play_many(one, tasks, config.concurrency, "rollouts", False)
        return [e for e in played if e is not None], lost

    async def collect_step(
        self, env: EnvClient, supervisor: Supervisor, step: int, tasks: list[tuple[str, int]]
    ) -> tuple[list[SupervisedEpisode], int]:
        """The step's episodes and how many were dropped; collected again (up to
        COLLECT_ATTEMPTS times) while every one is dropped, then EpisodesLost."""
        dropped = 0
        for attempt in range(1, COLLECT_ATTEMPTS + 1):
            episodes, lost = await self.collect(env, supervisor, tasks)
            dropped += len(lost)
            if episodes:
                return episodes, dropped
            log.warning(
                "step %d: all %d episodes dropped (attempt %d of %d)",
                step,
                len(tasks),
                attempt,
                COLLECT_ATTEMPTS,
            )
        raise EpisodesLost(
            f"step {step}: every episode was dropped in each of {COLLECT_ATTEMPTS} attempts; "
            f"is the env service at {self.config.env_url} up? Last error: {lost[-1]}"
        )

    def imitation(self, record: EpisodeRecord) -> SupervisedEpisode:
        """Off-policy SFT's view of an episode: no teacher, the policy's tokens are targets.

        Its teacher tokens are the tokens the policy forwarded to play the episode."""
        played = self.renderer.contexts(record.task, record.episode_turns(), self.config.history)
        return SupervisedEpisode(
            record=record,
            labels=["Strong"] * len(record.turns),
            forced=[False] * len(record.turns),
            teacher_logprobs=[[0.0] * len(t.response_ids) for t in record.turns],
            teacher_top1=[[1.0] * len(t.response_ids) for t in record.turns],
            topk_ids=None,
            topk_logprobs=None,
            model=ModelRef(name=Path(str(self.config.sft_policy)).name, revision="local"),
            tokens_forwarded=sum(len(context.input_ids) for context in played),
        )

    async def evaluate(self, env_url: str, teacher: TeacherClient | None) -> dict[str, float]:
        """Greedy success on each eval split of each environment, and the student's search
        decisions there in the first (trainer/diagnostics.py; the teacher's log-probs at
        them when ``teacher``)."""
        config = self.config
        out: dict[str, float] = {}
        self.model.eval()
        for name, agent in self.agents.items():
            for split in config.eval_splits:
                episodes = await play_split(
                    self.model, self.tokenizer, env_url, split, config, agent
                )
                result = summarize(split, episodes)
                prefix = "eval" if name == config.env else f"eval_{name}"
                for key in ("success", "avg_turns", "invalid_rate", "repeated_rate"):
                    out[f"{prefix}_{split}_{key}"] = float(getattr(result, key))
                if name == config.env:
                    out.update(await self.diagnose(split, episodes, teacher))
        return out

    async def diagnose(
        self, split: str, episodes: list[EpisodeRecord], teacher: TeacherClient | None
    ) -> dict[str, float]:
        """The student's search decisions in ``episodes`` (none when switched off)."""
        if self.config.diagnose_decisions == 0:
            return {}
        stats = await decision_stats(
            episodes, self.renderer, teacher, self.agent, self.config.diagnose_decisions
        )
        return stats.as_metrics(f"diag_{split}")

    async def run(
        self, on_step: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    ) -> list[dict[str, Any]]:
        """Train until ``config.steps``; ``on_step(row)`` is awaited after each step's log."""
        config, data = self.config, self.data
        logged: list[dict[str, Any]] = []
        async with AsyncExitStack() as stack:
            env, supervisor = await self.connect(stack)
            split_sizes = {
                name: await env.split_size(name, config.train_split)
                for name in config.environments()
            }
            if data.main and self.step == 0 and (config.eval_at_start or config.steps == 0):
                first: dict[str, Any] = {"step": 0}
                with timed("time_eval_s", first):
                    first.update(await self.evaluate(config.env_url, supervisor.diagnosing))
                logged.append(self.log_metrics(first))
            bar = tqdm(
                total=config.steps, initial=self.step, desc="train", disable=not self.progress
            )
            while self.step < config.steps:
                step, timings = self.step + 1, {}
                with timed("time_collect_s", timings):
                    tasks = data.share(self.task_ids(step, split_sizes))
                    mine, dropped = await self.collect_step(env, supervisor, step, tasks)
                with timed("time_train_s", timings):
                    batch = build_batch(self.renderer, self.imitated(mine), config)
                    losses = self.update(batch)
                episodes = data.gather(mine)  # every rank's, on rank 0 for the step's row
                dropped = int(data.all_sum(torch.tensor(dropped)))
                self.step = step
                if not data.main:  # rank 0 logs, evaluates and checkpoints
                    continue
                row = {**self.step_row(episodes, losses, dropped), **timings}
                if step == config.steps or (config.eval_every and step % config.eval_every == 0):
                    with timed("time_eval_s", row):
                        row.update(await self.evaluate(config.env_url, supervisor.diagnosing))
                # The row first: a kill before the checkpoint is complete replays the
                # step from the checkpoint before (its row is dropped then); the other
                # way round, a kill between them would lose the row for good.
                logged.append(self.log_metrics(row))
                if step == config.steps or (
                    config.checkpoint_every and step % config.checkpoint_every == 0
                ):
                    self.checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", success=f"{row['train_success']:.0%}")
                if on_step is not None:
                    await on_step(row)
            bar.close()
        if self.writer is not None:
            self.writer.close()
        return logged

    async def connect(self, stack: AsyncExitStack) -> tuple[EnvClient, Supervisor]:
        """The env client and the teachers' supervisor, open until ``stack`` closes; each
        teacher's vocabulary checked before the first step."""
        config = self.config
        env = await stack.enter_async_context(EnvClient(config.env_url, max_connections=64))
        groups = config.teacher_groups() if config.loss.kind != "sft" else {}
        urls = list(dict.fromkeys(url for group in groups.values() for url in group))
        teachers = [
            await stack.enter_async_context(TeacherClient(url, client_id=config.out_dir))
            for url in urls
        ]
        members = {p: [urls.index(url) for url in group] for p, group in groups.items()}
        supervisor = Supervisor(teachers, config, self.tokenizer, members)
        for index in range(len(teachers)):
            await supervisor.check(index)
        return env, supervisor

    def imitated(self, episodes: list[SupervisedEpisode]) -> list[SupervisedEpisode]:
        """The episodes the update learns from: all of them, but for off-policy SFT,
        which imitates only the episodes its policy won."""
        return [e for e in episodes if e.record.won or self.config.loss.kind != "sft"]

    def update(self, batch: Batch) -> dict[str, float]:
        """The optimizer steps on this rank's batch; the loss metrics of the whole step."""
        self.model.train()
        return train_on_batch(
            self.trained,
            self.optimizer,
            self.scheduler,
            batch,
            self.config,
            self.tokenizer.pad_token_id,
            self.data,
        )

    def step_row(
        self, episodes: list[SupervisedEpisode], losses: dict[str, float], dropped: int
    ) -> dict[str, Any]:
        """The step's metrics row (timings and evaluation are added to it)."""
        self.episodes_seen += len(episodes)
        labels = label_metrics(episodes)
        self.teacher_tokens += int(labels["teacher_tokens"])
        rollouts = summarize(self.config.train_split, [e.record for e in episodes])
        models = sorted({(e.model.name, e.model.revision) for e in episodes})
        teachers = [
            {
                "env": e.record.env,
                "task_id": e.record.task_id,
                "teacher": e.teacher,
                "model": e.model.name,
                "revision": e.model.revision,
                "alignment": "tokens" if e.teacher_offsets is None else "chunks",
            }
            for e in episodes
        ]
        return {
            "step": self.step,
            **losses,
            **labels,
            "teacher_tokens_total": self.teacher_tokens,
            "episodes_total": self.episodes_seen,
            "episodes_dropped": dropped,
            "train_success": rollouts.success,
            "train_avg_turns": rollouts.avg_turns,
            "train_invalid_rate": rollouts.invalid_rate,
            "train_repeated_rate": rollouts.repeated_rate,
            "teacher_model": models[-1][0],
            "teacher_revision": models[-1][1],
            "teacher_revisions": [revision for _, revision in models],
            "teacher_alignments": sorted({t["alignment"] for t in teachers}),
            "episode_teachers": teachers,
            "lr": self.scheduler.get_last_lr()[0],
        }


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the trainer extra; without it, JSONL only
        return None
    return SummaryWriter(str(folder))


def train(config: TrainConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) the training of ``config``; returns the metrics rows logged (by
    rank 0: other data-parallel ranks return none)."""
    trainer = Trainer(config, progress)
    try:
        return asyncio.run(trainer.run())
    finally:
        leave(trainer.data)
