"""`sage-opd train`: multi-turn OPD and SAGE-OPD through the env and teacher services.

One step:
1. collect: ``episodes_per_step`` train tasks are played by the student at once
   (trainer/rollout.py); each episode, as soon as it ends, goes to a teacher's
   fused call (every response token scored, every turn judged) while the other
   episodes still act. Teachers are used round-robin. The forced-Strong rules of
   METHOD.md are applied to the verdicts here.
2. train: the student recomputes the log-probs of its sampled tokens in the same
   contexts (client/prompts.py renders them) and the loss of trainer/losses.py is
   applied for ``loss.substeps`` optimizer steps. The token weights are fixed for
   the whole batch first, so the batch is forwarded in pieces of bounded size.
3. log: one JSON line per step (metrics.jsonl, on disk before anything else of the
   step is) and TensorBoard scalars; greedy evaluation every ``eval_every`` steps;
   then an atomic checkpoint every ``checkpoint_every`` steps, from which a new run
   in the same folder resumes (dropping the rows logged after it).

An episode the env service loses (its session gone after a restart, the service out
of reach) is dropped and counted in the step's ``episodes_dropped``; the step goes on
with the others. A step that loses every episode is collected again, up to
COLLECT_ATTEMPTS times, then the run stops with EpisodesLost.

The teacher's model and revision are logged per step. When the teacher service
switches to a model with another vocabulary, the run saves a checkpoint and
stops with TeacherVocabularyChanged (the scores could not be read any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from client.env import EnvClient
from client.fingerprint import (
    TokenizerFingerprint,
    VocabularyMismatch,
    check_same_vocabulary,
    fingerprint_of,
)
from client.http import ServiceCallError
from client.prompts import ChatRenderer, action_start
from client.protocol import EpisodeResponse, EpisodeTurn, Label, ModelRef
from client.teacher import TeacherClient
from trainer.baselines import play_many
from trainer.config import LossConfig, TrainConfig
from trainer.diagnostics import decision_stats
from trainer.distributed import SINGLE, DataParallel, data_parallel, leave, wrap
from trainer.evaluate import summarize
from trainer.losses import (
    FULL_DIVERGENCES,
    LossSwitches,
    TokenTargets,
    token_losses,
    token_weights,
    turn_scores,
)
from trainer.prepare import AGENT_FILE, agent_info, play_greedy, read_agent_info
from trainer.rollout import BatchedGenerator, EpisodeRecord, TurnRecord, run_episode
from trainer.sft import Example, batch_logits, collate, make_optimizer, warmup_cosine

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
MAX_FORWARD_TOKENS = 16_384  # padded tokens per student forward while training
COLLECT_ATTEMPTS = 3  # tries at collecting a step whose every episode was dropped


async def play_split(
    model: Any, tokenizer: Any, env_url: str, split: str, config: TrainConfig
) -> list[EpisodeRecord]:
    """Greedy episodes of ``model`` on ``split`` under the train config's rendering, turn
    limit and task selection: what each evaluation plays."""
    return await play_greedy(
        model,
        tokenizer,
        env_url,
        split,
        config.history,
        config.max_turns,
        config.eval_tasks,
        progress=False,
        env_name=config.env,
        show_admissible=config.show_admissible,
    )


class TeacherVocabularyChanged(RuntimeError):
    """The teacher service now serves a model whose vocabulary is not the student's."""


class EpisodesLost(RuntimeError):
    """Every episode of a step was dropped, in each of COLLECT_ATTEMPTS collections."""


def episode_lost(exc: BaseException) -> bool:
    """Whether ``exc``, raised while an episode talked to the env service, means the
    service lost the episode (it restarted, or could not be reached): its session is
    gone (404), the service failed (5xx), or the connection did."""
    if isinstance(exc, ServiceCallError):
        return exc.status >= 500 or (exc.status == 404 and exc.error.code == "session_not_found")
    return isinstance(exc, httpx.TransportError)


# ----------------------------------------------------------------------------- supervision


@dataclass
class SupervisedEpisode:
    record: EpisodeRecord
    labels: list[Label]  # after the forced-Strong rules
    forced: list[bool]  # the label was forced, not the judge's
    teacher_logprobs: list[list[float]]  # per turn, per response token
    teacher_top1: list[list[float]]
    topk_ids: list[list[list[int]]] | None
    topk_logprobs: list[list[list[float]]] | None
    model: ModelRef
    tokens_forwarded: int


def forced_label(turn: TurnRecord, repeated_is_strong: bool) -> bool:
    """METHOD.md: these turns are Strong without asking the judge."""
    if turn.failed:
        return True
    return repeated_is_strong and turn.repeated


def switches_of(loss: LossConfig) -> LossSwitches:
    """The loss of a config: OPD (every SAGE part off), SAGE-OPD, or imitation (sft)."""
    if loss.kind == "sft":  # every imitated token weighs 1 / N_tok
        return LossSwitches.opd(divergence="nll")
    common = {"ppo_clip": loss.ppo_clip, "divergence": loss.divergence, "jsd_beta": loss.jsd_beta}
    if loss.kind == "opd":
        return LossSwitches.opd(**common)
    return LossSwitches(
        intervention=loss.intervention,
        confidence=loss.confidence,
        normalization=loss.normalization,
        alpha=loss.alpha,
        **common,
    )


def wants_top_k(loss: LossConfig) -> int:
    """How many teacher log-probs per token the loss reads (0: only the sampled token's)."""
    return loss.top_k if loss.kind != "sft" and loss.divergence in FULL_DIVERGENCES else 0


class Supervisor:
    """Sends finished episodes to the teachers (round-robin) and reads their answers."""

    def __init__(
        self,
        teachers: list[TeacherClient],
        config: TrainConfig,
        student_fingerprint: TokenizerFingerprint,
    ) -> None:
        self.teachers = teachers
        self._next = itertools.cycle(range(len(teachers)))
        self.config = config
        self.student_fingerprint = student_fingerprint
        self.checked: set[tuple[int, str, str]] = set()  # (teacher, model, revision) known good
        # The judge is asked only when its verdicts are used (OPD never reads them).
        self.judge = config.loss.kind == "sage" and config.loss.intervention

    async def check(self, index: int) -> None:
        """Check the vocabulary of teacher ``index``'s active model (once per model revision)."""
        active = await self.teachers[index].active_model()
        key = (index, active.name, active.revision)
        if key in self.checked:
            return
        assert active.fingerprint is not None
        try:
            check_same_vocabulary(self.student_fingerprint, active.fingerprint)
        except VocabularyMismatch as exc:
            raise TeacherVocabularyChanged(
                f"teacher {self.teachers[index].base_url} serves {active.name} "
                f"(revision {active.revision}): {exc}"
            ) from exc
        self.checked.add(key)

    def wire_turns(self, record: EpisodeRecord) -> list[EpisodeTurn]:
        """The turns as the student saw them (no admissible list if it was not shown one)."""
        turns = record.episode_turns()
        if not self.config.show_admissible:
            turns = [turn.model_copy(update={"admissible_actions": []}) for turn in turns]
        return turns

    async def supervise(self, record: EpisodeRecord) -> SupervisedEpisode:
        index = next(self._next)
        try:
            answer: EpisodeResponse = await self.teachers[index].score_episode(
                record.task,
                self.wire_turns(record),
                judge=self.judge,
                top_k=wants_top_k(self.config.loss),
                history=self.config.history,
            )
        except ServiceCallError:
            await self.check(index)  # a model with another vocabulary refuses our ids
            raise
        if (index, answer.model.name, answer.model.revision) not in self.checked:
            await self.check(index)  # a model not seen before answered: same vocabulary?
        labels, forced = [], []
        for turn, scored in zip(record.turns, answer.turns, strict=True):
            if len(scored.scores.logprobs) != len(turn.response_ids):
                raise ValueError("the teacher scored another number of tokens than were sent")
            force = forced_label(turn, self.config.loss.force_strong_repeated)
            force = force or (self.judge and scored.verdict is None)
            verdict = scored.verdict.label if scored.verdict is not None else "Strong"
            labels.append("Strong" if force else verdict)
            forced.append(force)
        top_k = wants_top_k(self.config.loss) > 0
        return SupervisedEpisode(
            record=record,
            labels=labels,
            forced=forced,
            teacher_logprobs=[t.scores.logprobs for t in answer.turns],
            teacher_top1=[t.scores.top1_probs for t in answer.turns],
            topk_ids=[t.scores.topk_ids or [] for t in answer.turns] if top_k else None,
            topk_logprobs=[t.scores.topk_logprobs or [] for t in answer.turns] if top_k else None,
            model=answer.model,
            tokens_forwarded=answer.tokens_forwarded,
        )


# ----------------------------------------------------------------------------- the batch


@dataclass
class Batch:
    """The step's trained tokens, flat (suffix _N), and the contexts that hold them."""

    contexts: list[Example]  # each context's trained spans, in token order
    targets: TokenTargets
    teacher_top1_N: torch.Tensor
    turn_N: torch.Tensor
    labels: list[Label]


def build_batch(
    renderer: ChatRenderer, episodes: list[SupervisedEpisode], config: TrainConfig
) -> Batch:
    """Every episode's contexts and, per trained token, what the loss reads.

    With ``loss.tokens: action`` a response's trained tokens start at its action line.
    The teacher's top-k (full divergences only) is cut to the first ``loss.top_k``
    entries of each token: the answer may append the sampled token's own entry."""
    contexts, old, teacher, top1, turn_index = [], [], [], [], []
    labels: list[Label] = []
    top_k = wants_top_k(config.loss)
    topk_ids: list[list[int]] = []
    topk_logprobs: list[list[float]] = []
    for episode in episodes:
        record = episode.record
        offset = len(labels)
        labels.extend(episode.labels)
        for context in renderer.contexts(record.task, record.episode_turns(), config.history):
            spans = []
            for t, (start, end) in zip(context.turns, context.spans, strict=True):
                turn = record.turns[t]
                k = 0  # the first trained token of the response
                if config.loss.tokens == "action":
                    k = action_start(renderer.tokenizer, turn.response_ids)
                spans.append((start + k, end))
                old.extend(turn.sampling_logprobs[k:])
                teacher.extend(episode.teacher_logprobs[t][k:])
                top1.extend(episode.teacher_top1[t][k:])
                turn_index.extend([offset + t] * (end - start - k))
                if top_k:
                    assert episode.topk_ids is not None and episode.topk_logprobs is not None
                    topk_ids.extend(row[:top_k] for row in episode.topk_ids[t][k:])
                    topk_logprobs.extend(row[:top_k] for row in episode.topk_logprobs[t][k:])
            contexts.append(Example(context.input_ids, spans))
    return Batch(
        contexts=contexts,
        targets=TokenTargets(
            old_logprobs_N=torch.tensor(old, dtype=torch.float32),
            teacher_logprobs_N=torch.tensor(teacher, dtype=torch.float32),
            topk_ids_NK=torch.tensor(topk_ids, dtype=torch.long) if top_k else None,
            topk_logprobs_NK=torch.tensor(topk_logprobs, dtype=torch.float32) if top_k else None,
        ),
        teacher_top1_N=torch.tensor(top1, dtype=torch.float32),
        turn_N=torch.tensor(turn_index, dtype=torch.long),
        labels=labels,
    )


def _pieces(batch: Batch) -> list[list[int]]:
    """Context indices in groups of at most MAX_FORWARD_TOKENS padded tokens."""
    pieces: list[list[int]] = [[]]
    width = 0
    for i, context in enumerate(batch.contexts):
        new_width = max(width, len(context.input_ids))
        if pieces[-1] and new_width * (len(pieces[-1]) + 1) > MAX_FORWARD_TOKENS:
            pieces.append([])
            new_width = len(context.input_ids)
        pieces[-1].append(i)
        width = new_width
    return pieces


def student_token_outputs(
    model: Any, contexts: list[Example], pad_id: int, temperature: float, full: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_S of each trained token, in the batch's flat token order (and, with ``full``,
    the log-probs over the whole vocabulary there), at the sampling ``temperature``:
    the policy that sampled the tokens is softmax(logits / T), so at T != 1 the update
    stays on-policy only if the student is differentiated in that form."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(contexts, pad_id).items()}
    logits_BLV = batch_logits(model, batch)
    rows, cols = [], []
    for b, context in enumerate(contexts):
        for start, end in context.spans:
            rows.extend([b] * (end - start))
            cols.extend(range(start - 1, end - 1))  # the logits that predict each token
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    logits_NV = logits_BLV[rows_t, cols_t].float()
    if temperature > 0:
        logits_NV = logits_NV / temperature
    targets_N = batch["input_ids"][rows_t, cols_t + 1]
    logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
    logprobs_N = logprobs_NV.gather(1, targets_N[:, None])[:, 0]
    return logprobs_N, (logprobs_NV if full else None)


def train_on_batch(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Batch,
    config: TrainConfig,
    pad_id: int,
    data: DataParallel = SINGLE,
) -> dict[str, float]:
    """``loss.substeps`` optimizer steps on the batch; returns the step's loss metrics.

    The loss is trainer/losses.py's multi_turn_loss, sum_tj w_tj l_tj: the weights come
    from the whole batch once, the token losses from each piece that is forwarded.
    Over data-parallel ranks (``data``; ``model`` then DistributedDataParallel) the
    batch is this rank's share: the weights' denominator and the metrics are summed
    over the ranks, and each rank's loss is scaled by their number, since DDP averages
    the gradients it sums: every rank steps with the gradient of the whole batch's loss."""
    switches = switches_of(config.loss)
    s_T = turn_scores(batch.teacher_top1_N, batch.turn_N, batch.labels, switches)
    w_N = token_weights(s_T, batch.turn_N, switches, data.all_sum)
    targets = batch.targets
    old_N, teacher_N = targets.old_logprobs_N, targets.teacher_logprobs_N
    sums = data.all_sum(
        torch.tensor(
            [len(batch.turn_N), len(s_T), s_T.sum(), w_N.sum(), (old_N - teacher_N).sum()],
            dtype=torch.float64,
        )
    )
    tokens, turns, score_sum, weight_sum, gap_sum = sums.tolist()
    skipped = weight_sum == 0
    metrics: dict[str, float] = {
        "tokens": tokens,
        "skipped": float(skipped),
        "mean_turn_score": score_sum / turns if turns else 0.0,
        "mean_token_weight": weight_sum,
    }
    if switches.divergence != "nll":  # imitation has no teacher to compare with
        metrics["kl_estimate"] = gap_sum / tokens if tokens else 0.0
    if skipped:  # no turn is supervised: nothing to learn, never a NaN
        metrics.update(loss=0.0, grad_norm=0.0)
        return metrics
    # Where each context's tokens start in the flat tensors.
    trained = (sum(end - start for start, end in c.spans) for c in batch.contexts)
    bounds = list(itertools.accumulate(trained, initial=0))
    device = next(model.parameters()).device
    full = switches.divergence in FULL_DIVERGENCES
    pieces: list[list[int]] = _pieces(batch) if batch.contexts else [[]]
    for _ in range(config.loss.substeps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for index, piece in enumerate(pieces):
            # DDP sums gradients at the last backward of the step, not at each piece's.
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last else no_sync(model):
                if not piece:  # a rank with no trained token still joins the gradient sum
                    piece_loss = idle_loss(model, pad_id)
                else:
                    start, end = bounds[piece[0]], bounds[piece[-1] + 1]
                    logprobs_N, logprobs_NV = student_token_outputs(
                        model, [batch.contexts[i] for i in piece], pad_id, config.temperature, full
                    )
                    piece_targets = targets.slice(start, end).to(device)
                    l_N = token_losses(logprobs_N, piece_targets, switches, logprobs_NV)
                    piece_loss = (w_N[start:end].to(device) * l_N).sum()
                (piece_loss * data.world).backward()
            total += piece_loss.detach().double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    scheduler.step()
    metrics.update(loss=float(data.all_sum(total)), grad_norm=float(grad_norm))
    return metrics


def no_sync(model: Any) -> contextlib.AbstractContextManager:
    """DDP's gradient sum held back (a model alone has nothing to hold back)."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def idle_loss(model: Any, pad_id: int) -> torch.Tensor:
    """A zero loss through every parameter, for a rank whose share has nothing to train:
    its backward adds nothing, but DDP's gradient sum needs every rank to take part."""
    device = next(model.parameters()).device
    logits = batch_logits(model, {"input_ids": torch.tensor([[pad_id]], device=device)})
    return logits.sum() * 0.0


def label_metrics(episodes: list[SupervisedEpisode]) -> dict[str, float]:
    labels = Counter(label for e in episodes for label in e.labels)
    n = max(1, sum(labels.values()))
    forced = sum(f for e in episodes for f in e.forced)
    top1 = [p for e in episodes for turn in e.teacher_top1 for p in turn]
    return {
        "label_skip": labels["Skip"] / n,
        "label_weak": labels["Weak"] / n,
        "label_strong": labels["Strong"] / n,
        "forced_strong": forced / n,
        "teacher_confidence": sum(top1) / max(1, len(top1)),
        "teacher_tokens": float(sum(e.tokens_forwarded for e in episodes)),
    }


# ----------------------------------------------------------------------------- checkpoints


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
    agent: dict[str, Any],
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
    (building / AGENT_FILE).write_text(json.dumps(agent))
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
        self.agent = {**read_agent_info(source), **agent_info(config)}
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

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Append the row to metrics.jsonl, on disk (fsync) before this returns."""
        with (self.out_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

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

    def task_ids(self, step: int, split_size: int) -> list[int]:
        rng = random.Random(f"{self.config.seed}:{step}")
        count = min(self.config.episodes_per_step, split_size)
        return rng.sample(range(split_size), count)  # the step's, over all ranks

    async def collect(
        self, env: EnvClient, supervisor: Supervisor, task_ids: list[int]
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

            async def one(task_id: int) -> SupervisedEpisode | None:
                try:
                    record = await run_episode(
                        env,
                        generator,
                        self.renderer,
                        config.train_split,  # type: ignore[arg-type]
                        task_id,
                        config.history,
                        config.max_turns,
                        config.env,
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

            played = await play_many(one, task_ids, config.concurrency, "rollouts", False)
        return [e for e in played if e is not None], lost

    async def collect_step(
        self, env: EnvClient, supervisor: Supervisor, step: int, task_ids: list[int]
    ) -> tuple[list[SupervisedEpisode], int]:
        """The step's episodes and how many were dropped; collected again (up to
        COLLECT_ATTEMPTS times) while every one is dropped, then EpisodesLost."""
        dropped = 0
        for attempt in range(1, COLLECT_ATTEMPTS + 1):
            episodes, lost = await self.collect(env, supervisor, task_ids)
            dropped += len(lost)
            if episodes:
                return episodes, dropped
            log.warning(
                "step %d: all %d episodes dropped (attempt %d of %d)",
                step,
                len(task_ids),
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
        """Greedy success on each eval split, and the student's search decisions there
        (trainer/diagnostics.py; the teacher's log-probs at them when ``teacher``)."""
        config = self.config
        out: dict[str, float] = {}
        self.model.eval()
        for split in config.eval_splits:
            episodes = await play_split(self.model, self.tokenizer, env_url, split, config)
            result = summarize(split, episodes)
            for key in ("success", "avg_turns", "invalid_rate", "repeated_rate"):
                out[f"eval_{split}_{key}"] = float(getattr(result, key))
            if config.diagnose_decisions > 0:
                stats = await decision_stats(
                    episodes,
                    self.renderer,
                    teacher,
                    config.history,
                    self.agent.get("thought_style", "number"),
                    config.diagnose_decisions,
                )
                out.update(stats.as_metrics(f"diag_{split}"))
        return out

    async def run(
        self, on_step: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    ) -> list[dict[str, Any]]:
        """Train until ``config.steps``; ``on_step(row)`` is awaited after each step's log."""
        config, data = self.config, self.data
        logged: list[dict[str, Any]] = []
        async with AsyncExitStack() as stack:
            env = await stack.enter_async_context(EnvClient(config.env_url, max_connections=64))
            teachers = [
                await stack.enter_async_context(TeacherClient(url, client_id=config.out_dir))
                for url in (config.teacher_urls if config.loss.kind != "sft" else [])
            ]
            supervisor = Supervisor(teachers, config, fingerprint_of(self.tokenizer))
            diagnosing = teachers[0] if teachers else None  # scores the eval decisions
            for index in range(len(teachers)):  # before the first step: same vocabulary?
                await supervisor.check(index)
            split_size = await env.split_size(config.env, config.train_split)
            if data.main and self.step == 0 and (config.eval_at_start or config.steps == 0):
                eval_start = time.perf_counter()
                first = {"step": 0, **await self.evaluate(config.env_url, diagnosing)}
                first["time_eval_s"] = time.perf_counter() - eval_start
                self.log_metrics(first)
                logged.append(first)
            bar = tqdm(
                total=config.steps, initial=self.step, desc="train", disable=not self.progress
            )
            while self.step < config.steps:
                step = self.step + 1
                started = time.perf_counter()
                try:
                    mine, dropped = await self.collect_step(
                        env, supervisor, step, data.share(self.task_ids(step, split_size))
                    )
                except TeacherVocabularyChanged:
                    if data.main:
                        path = self.checkpoint()
                        log.error(
                            "teacher vocabulary changed; checkpoint of step %d at %s",
                            self.step,
                            path,
                        )
                    raise
                collected = time.perf_counter()
                self.model.train()
                # Off-policy SFT imitates only the episodes its policy won.
                imitated = [e for e in mine if e.record.won or config.loss.kind != "sft"]
                batch = build_batch(self.renderer, imitated, config)
                metrics = train_on_batch(
                    self.trained,
                    self.optimizer,
                    self.scheduler,
                    batch,
                    config,
                    self.tokenizer.pad_token_id,
                    data,
                )
                trained = time.perf_counter()
                episodes = data.gather(mine)  # every rank's, for the step's row
                dropped = int(data.all_sum(torch.tensor(dropped)))
                self.step = step
                self.episodes_seen += len(episodes)
                labels = label_metrics(episodes)
                self.teacher_tokens += int(labels["teacher_tokens"])
                rollouts = summarize(config.train_split, [e.record for e in episodes])
                models = sorted({(e.model.name, e.model.revision) for e in episodes})
                row: dict[str, Any] = {
                    "step": step,
                    **metrics,
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
                    "lr": self.scheduler.get_last_lr()[0],
                    "time_collect_s": collected - started,
                    "time_train_s": trained - collected,
                }
                if not data.main:
                    continue
                last = step == config.steps
                if last or (config.eval_every and step % config.eval_every == 0):
                    eval_start = time.perf_counter()
                    row.update(await self.evaluate(config.env_url, diagnosing))
                    row["time_eval_s"] = time.perf_counter() - eval_start
                # The row first: a kill before the checkpoint is complete replays the
                # step from the checkpoint before (its row is dropped then); the other
                # way round, a kill between them would lose the row for good.
                self.log_metrics(row)
                logged.append(row)
                if last or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self.checkpoint()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", success=f"{rollouts.success:.0%}")
                if on_step is not None:
                    await on_step(row)
            bar.close()
        if self.writer is not None:
            self.writer.close()
        return logged


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
