"""Student rollouts: many episodes in flight, the student's generation batched across them.

Each episode is an asyncio task that talks to the env service. When it needs an
action it hands its prompt to the :class:`BatchedGenerator`, which runs one
``generate`` (KV cache, left padding, stop at end of turn) for every episode
waiting at that moment, in a worker thread, so env calls and teacher calls of
other episodes go on meanwhile. Each turn records the sampled token ids and
their log-probs under the sampling model at temperature 1 (what the trainer
recomputes), the action parsed from them, and what the environment answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from client.env import EnvClient
from client.prompts import ChatRenderer, History, parse_action
from client.protocol import EpisodeTurn, Split
from trainer.baselines import play_many


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log pi(token | prefix) at temperature 1, per token


@dataclass
class TurnRecord:
    observation: str
    admissible_actions: list[str]
    prompt_ids: list[int]
    response_ids: list[int]
    sampling_logprobs: list[float]
    action: str | None  # None: the response named no action
    feedback: str = ""
    admissible: bool = False  # the action was among the admissible actions
    repeated: bool = False  # the turn before's action again, with the same feedback again

    def as_episode_turn(self) -> EpisodeTurn:
        return EpisodeTurn(
            observation=self.observation,
            admissible_actions=self.admissible_actions,
            response_ids=self.response_ids,
            feedback=self.feedback,
        )


@dataclass
class EpisodeRecord:
    split: str
    task_id: int
    task: str
    task_type: str
    turns: list[TurnRecord] = field(default_factory=list)
    won: bool = False

    def episode_turns(self) -> list[EpisodeTurn]:
        return [turn.as_episode_turn() for turn in self.turns]


class BatchedGenerator:
    """Collects prompts from concurrent episodes and generates for all of them at once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        max_batch: int = 64,
        seed: int = 0,
        gather_s: float = 0.25,
    ) -> None:
        """Episodes played with this generator as their policy (run_episode) are counted
        while in flight; a batch waits until every one of them has its prompt in, or
        ``gather_s`` has passed since the first (an episode slow in the environment or
        at the teacher does not hold the others up for longer). Without the wait the
        episodes split into groups that stay out of phase: a generate takes far
        longer than an env step, and each group waits for the other's generate."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.in_flight = 0  # episodes playing with this generator (see episode())
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._pending: list[tuple[list[int], asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes, for metrics

    async def __aenter__(self) -> BatchedGenerator:
        self._worker = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    @contextlib.asynccontextmanager
    async def episode(self) -> AsyncIterator[None]:
        """Count an episode as in flight (its next prompt is awaited before a batch starts)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._wakeup.set()

    async def generate(self, prompt_ids: list[int]) -> Sample:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_ids, future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = asyncio.get_running_loop().time() + self.gather_s
            await asyncio.sleep(0)  # let every episode that is ready join this batch
            while len(self._pending) < min(self.in_flight, self.max_batch):
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                # generate() and an episode's end set the event; nothing runs between
                # the check above and this clear, so no wake-up is lost.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                samples = await asyncio.to_thread(self.generate_now, [p for p, _ in batch])
            except Exception as exc:  # fail the episodes that asked, not the loop
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches.append(len(batch))
            for (_, future), sample in zip(batch, samples, strict=True):
                if not future.done():
                    future.set_result(sample)

    @torch.inference_mode()
    def generate_now(self, prompts: list[list[int]]) -> list[Sample]:
        """One left-padded generate for ``prompts``; stops each at its end-of-turn token."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids_BL = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            input_ids_BL[b, width - len(prompt) :] = torch.tensor(prompt)
            mask_BL[b, width - len(prompt) :] = 1
        sampling = self.temperature > 0
        with _seeded(self.generator):
            output = self.model.generate(
                input_ids=input_ids_BL.to(device),
                attention_mask=mask_BL.to(device),
                max_new_tokens=self.max_new_tokens,
                do_sample=sampling,
                temperature=self.temperature if sampling else None,
                top_k=0 if sampling else None,
                top_p=1.0 if sampling else None,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_BN = output.sequences[:, width:].cpu()
        # Raw logits: log-probs at temperature 1, the policy the loss differentiates.
        logprobs_BNV = torch.log_softmax(torch.stack(output.logits, dim=1).float().cpu(), dim=-1)
        samples = []
        for b in range(len(prompts)):
            ids, logprobs = [], []
            for n, token in enumerate(new_BN[b].tolist()):
                ids.append(token)
                logprobs.append(logprobs_BNV[b, n, token].item())
                if token == self.eos_id:
                    break
            samples.append(Sample(ids, logprobs))
        return samples


@contextlib.contextmanager
def _seeded(generator: torch.Generator):  # noqa: ANN202
    """Sample from ``generator``'s stream (generate uses the global RNG), then restore it."""
    state = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(torch.get_rng_state())
        torch.set_rng_state(state)


Policy = Callable[[list[int]], Awaitable[Sample]]


def _tracking(policy: Policy | BatchedGenerator) -> tuple[Policy, Any]:
    """The policy's generate function, and a context that counts the episode in flight."""
    if isinstance(policy, BatchedGenerator):
        return policy.generate, policy.episode()
    return policy, contextlib.nullcontext()


async def run_episode(
    env: EnvClient,
    policy: Policy | BatchedGenerator,
    renderer: ChatRenderer,
    split: Split,
    task_id: int,
    history: History = None,
    max_turns: int | None = None,
    env_name: str = "household",
) -> EpisodeRecord:
    """Play one task with ``policy`` until done; close the session.

    ``policy``: a BatchedGenerator (the episode is counted in flight, so batches wait
    for it) or any async function from prompt ids to a sample.
    """
    policy, in_flight = _tracking(policy)
    async with (
        in_flight,
        env.open_session(env_name, split, task_id, max_turns=max_turns) as created,
    ):
        record = EpisodeRecord(split, task_id, created.task.goal, created.task.task_type)
        result = created.first
        while not result.done:
            prompt = renderer.prompt(
                record.task,
                record.episode_turns(),
                result.observation,
                result.admissible_actions,
                history,
            )
            sample = await policy(prompt)
            text = renderer.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            action = parse_action(text)
            turn = TurnRecord(
                observation=result.observation,
                admissible_actions=result.admissible_actions,
                prompt_ids=prompt,
                response_ids=sample.token_ids,
                sampling_logprobs=sample.logprobs,
                action=action,
                admissible=action in result.admissible_actions,
            )
            # An unreadable response still costs a turn: the environment sees no action.
            result = await env.step(created.session_id, action or "")
            turn.feedback = result.observation
            last = record.turns[-1] if record.turns else None
            turn.repeated = last is not None and (last.action, last.feedback) == (
                turn.action,
                turn.feedback,
            )
            record.turns.append(turn)
        record.won = result.won
    return record


async def run_episodes(
    env: EnvClient,
    policy: Policy | BatchedGenerator,
    renderer: ChatRenderer,
    split: Split,
    task_ids: list[int],
    history: History = None,
    max_turns: int | None = None,
    concurrency: int = 64,
    env_name: str = "household",
    progress: bool = False,
) -> list[EpisodeRecord]:
    """Play ``task_ids`` with up to ``concurrency`` episodes in flight; keep their order."""
    return await play_many(
        lambda t: run_episode(env, policy, renderer, split, t, history, max_turns, env_name),
        task_ids,
        concurrency,
        f"episodes on {split}",
        progress,
    )
