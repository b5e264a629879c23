"""Student rollouts: many episodes in flight, the student's generation batched across them.

Each episode is an asyncio task that talks to the env service. When it needs an
action it hands its prompt to the :class:`BatchedGenerator`, which decodes for
every episode waiting at that moment at once (stop at end of turn), in a worker
thread, so env calls and teacher calls of other episodes go on meanwhile. An
episode's prompt grows by one response and one observation a turn, so the
generator keeps each episode's KV cache between its turns and forwards only the
new tokens: with the whole history in context, the prefill of a turn costs its own
tokens, not the episode's. Each turn records the sampled token ids and their
log-probs under the distribution they were sampled from, softmax(logits / T) (what
the trainer recomputes), the action parsed from them, and what the environment
answered.

Each episode samples from its own random generator, seeded from the generator's seed
and the episode's key (its env, split and task): an episode's tokens do not depend on
which other episodes shared its batches, so a run repeats itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from client.env import EnvClient
from client.household import NOTHING_HAPPENS
from client.prompts import ChatRenderer, History, parse_action
from client.protocol import EpisodeTurn, SessionCreated, Split, StepResult
from trainer.episodes import Task, play_episode, play_many
from trainer.models import DEFAULT_AGENT, AgentSpec


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log pi(token | prefix) at the sampling temperature, per token


@dataclass
class CachedPrefix:
    """What the model has already forwarded for one episode: the ids and, per layer,
    their keys and values (heads x tokens x head dim)."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


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

    @property
    def failed(self) -> bool:
        """The response named no admissible action, or the action did nothing."""
        return self.action is None or not self.admissible or self.feedback == NOTHING_HAPPENS

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
    env: str = "household"

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
        reuse_cache: bool = True,
        answer_timeout_s: float = 900.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        """Episodes played with this generator as their policy (run_episode) are counted
        while in flight; a batch waits until every one of them has its prompt in, or
        ``gather_s`` has passed since the first (an episode slow in the environment or
        at the teacher does not hold the others up for longer). Without the wait the
        episodes split into groups that stay out of phase: a generate takes far
        longer than an env step, and each group waits for the other's generate.

        ``reuse_cache``: keep each episode's KV cache between its turns (memory: one
        cache per episode in flight). ``answer_timeout_s``: a prompt not answered by
        then fails its episode loudly instead of leaving the run waiting.
        ``stop_timeout_s``: how long leaving the ``async with`` waits for the worker to
        stop before it raises instead (it never waits forever).

        ``seed``: an episode with a key samples from a generator seeded from the seed
        and its key (see :func:`episode_seed`); calls without a key share one seeded
        from ``seed`` alone."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.answer_timeout_s = answer_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.reuse_cache = reuse_cache
        self._cache_arg = _cache_argument(model)
        self._caches: dict[Hashable, CachedPrefix] = {}
        self._live: set[Hashable] = set()  # episodes in flight, by key
        self.in_flight = 0  # episodes playing with this generator (see episode())
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._rngs: dict[Hashable, torch.Generator] = {}  # per episode key
        self._names: Counter[tuple] = Counter()  # episodes started per name (episode_key)
        self._pending: list[tuple[list[int], Hashable | None, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes, for metrics
        self.prompt_tokens_forwarded = 0  # prompt tokens prefilled (the rest came from caches)

    async def __aenter__(self) -> BatchedGenerator:
        self._worker = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the worker; prompts it never took fail. Raises RuntimeError if the worker
        does not stop within ``stop_timeout_s`` (the caller is never left waiting)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.cancel()
        done, _ = await asyncio.wait({worker}, timeout=self.stop_timeout_s)
        self._caches.clear()
        if not done:
            raise RuntimeError(
                f"the generation worker did not stop within {self.stop_timeout_s:.0f}s "
                "of being cancelled"
            )
        if not worker.cancelled() and worker.exception() is not None:
            raise RuntimeError("the generation worker failed") from worker.exception()

    @contextlib.asynccontextmanager
    async def episode(self, key: Hashable | None = None) -> AsyncIterator[None]:
        """Count an episode as in flight (its next prompt is awaited before a batch
        starts); its generate calls with ``key`` share a KV cache and a random generator
        (see episode_seed), both dropped at the end."""
        self.in_flight += 1
        if key is not None:
            self._live.add(key)
        try:
            yield
        finally:
            self.in_flight -= 1
            self._live.discard(key)
            self._caches.pop(key, None)
            self._rngs.pop(key, None)
            self._wakeup.set()

    def episode_key(self, *name: Hashable) -> tuple:
        """A key for the next episode called ``name`` (e.g. its env, split and task):
        the name and how many episodes of that name this generator started before. Keys
        are unique, and the same in every run that plays the same episodes."""
        count = self._names[name]
        self._names[name] += 1
        return (*name, count)

    def _rng(self, key: Hashable | None) -> torch.Generator:
        """The random generator of ``key``'s episode (None: the shared one)."""
        if key is None:
            return self.generator
        if key not in self._rngs:
            seed = episode_seed(self.seed, key)
            self._rngs[key] = torch.Generator(device="cpu").manual_seed(seed)
        return self._rngs[key]

    async def generate(self, prompt_ids: list[int], key: Hashable | None = None) -> Sample:
        """A response to ``prompt_ids``; calls with the same ``key`` (one episode, see
        episode()) reuse the KV cache of the prompt's prefix that was forwarded before."""
        if self._worker is not None and self._worker.done():
            raise RuntimeError("the generator's worker has stopped; nothing would answer")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_ids, key, future))
        self._wakeup.set()
        try:
            async with asyncio.timeout(self.answer_timeout_s):
                return await future
        except TimeoutError as exc:
            raise TimeoutError(
                f"no generation for a prompt after {self.answer_timeout_s:.0f}s "
                f"({len(self._pending)} prompts pending, {self.in_flight} episodes in flight)"
            ) from exc

    async def _loop(self) -> None:
        batch: list[tuple[list[int], Hashable | None, asyncio.Future]] = []
        try:
            while True:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                deadline = asyncio.get_running_loop().time() + self.gather_s
                await asyncio.sleep(0)  # let every episode that is ready join this batch
                while len(self._pending) < min(self.in_flight, self.max_batch):
                    if deadline <= asyncio.get_running_loop().time():
                        break
                    # generate() and an episode's end set the event; nothing runs between
                    # the check above and this clear, so no wake-up is lost. (Not
                    # asyncio.wait_for: on Python 3.11 it swallows a cancellation that
                    # arrives as the event is set, and the worker would never stop.)
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await self._wakeup.wait()
                batch = self._pending[: self.max_batch]
                self._pending = self._pending[self.max_batch :]
                prompts = [prompt for prompt, _, _ in batch]
                reuse = [self._caches.pop(key, None) for _, key, _ in batch]
                rngs = [self._rng(key) for _, key, _ in batch]
                try:
                    samples, caches = await asyncio.to_thread(
                        self.generate_now, prompts, reuse, rngs
                    )
                except Exception as exc:  # fail the episodes that asked, not the loop
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    batch = []
                    continue
                self.batches.append(len(batch))
                for (_, key, future), sample, cache in zip(batch, samples, caches, strict=True):
                    # Kept on this loop only, so an episode that has ended keeps no cache.
                    if self.reuse_cache and key in self._live:
                        self._caches[key] = cache
                    if not future.done():
                        future.set_result(sample)
                batch = []
        finally:  # stopped: nobody will answer the prompts still waiting
            for _, _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(RuntimeError("the generator stopped before answering"))
            self._pending = []

    @torch.inference_mode()
    def generate_now(
        self,
        prompts: list[list[int]],
        reuse: list[CachedPrefix | None] | None = None,
        rngs: list[torch.Generator] | None = None,
    ) -> tuple[list[Sample], list[CachedPrefix]]:
        """Decode for ``prompts`` at once; stop each at its end-of-turn token.

        Row b samples from ``rngs[b]`` (default: the shared generator), one draw per
        token it samples, so what a row samples does not depend on the other rows.

        A row forwards only what follows the longest prefix its ``reuse`` cache shares
        with its prompt. Rows are laid out [pad][cached][pad][new tokens], the pads masked and
        positions given explicitly, so rows with caches of any length share one
        forward. Returns the samples and each row's cache after them.
        """
        device = next(self.model.parameters()).device
        rows = len(prompts)
        rngs = rngs or [self.generator] * rows
        reuse = [_shared_prefix(c, p) for c, p in zip(reuse or [None] * rows, prompts, strict=True)]
        cached = [len(c.ids) if c is not None else 0 for c in reuse]
        new = [p[n:] for p, n in zip(prompts, cached, strict=True)]
        width_c, width_s = max(cached), max(len(ids) for ids in new)
        self.prompt_tokens_forwarded += sum(len(ids) for ids in new)
        input_ids_BS = torch.full((rows, width_s), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((rows, width_c + width_s), dtype=torch.long)
        positions_BS = torch.zeros((rows, width_s), dtype=torch.long)
        for b, (ids, n) in enumerate(zip(new, cached, strict=True)):
            input_ids_BS[b, width_s - len(ids) :] = torch.tensor(ids)
            mask_BL[b, width_c - n : width_c] = 1
            mask_BL[b, width_c + width_s - len(ids) :] = 1
            positions_BS[b, width_s - len(ids) :] = torch.arange(n, n + len(ids))
        mask_BL = mask_BL.to(device)
        output = self.model(
            input_ids=input_ids_BS.to(device),
            attention_mask=mask_BL,
            position_ids=positions_BS.to(device),
            **{self._cache_arg: self._batch_cache(reuse, cached, width_c, device)},
            use_cache=True,
            logits_to_keep=1,
        )
        next_position_B = torch.tensor([len(p) for p in prompts], device=device)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finished = [False] * rows
        forwarded = 0  # sampled tokens that went through the model (are in the cache)
        while True:
            logits_BV = output.logits[:, -1].float().cpu()
            # Log-probs of the policy that samples, softmax(logits / T): what the trainer
            # recomputes and differentiates (greedy decoding records those at T = 1).
            if self.temperature > 0:
                logprobs_BV = torch.log_softmax(logits_BV / self.temperature, dim=-1)
                probs_BV = logprobs_BV.exp()
                # A finished row draws nothing (its token is ignored), so that its
                # generator advances only with its own tokens.
                token_B = torch.tensor(
                    [
                        self.pad_id
                        if finished[b]
                        else int(torch.multinomial(probs_BV[b], 1, generator=rngs[b]))
                        for b in range(rows)
                    ]
                )
            else:
                logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
                token_B = logits_BV.argmax(dim=-1)
            for b, token in enumerate(token_B.tolist()):
                if not finished[b]:
                    tokens[b].append(token)
                    logprobs[b].append(logprobs_BV[b, token].item())
                    finished[b] = token == self.eos_id or len(tokens[b]) == self.max_new_tokens
            if all(finished):
                break
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((rows, 1))], dim=1)
            output = self.model(
                input_ids=token_B[:, None].to(device),
                attention_mask=mask_BL,
                position_ids=(next_position_B + forwarded)[:, None],
                **{self._cache_arg: output[self._cache_arg]},
                use_cache=True,
            )
            forwarded += 1
        samples = [Sample(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]
        if not self.reuse_cache:
            return samples, [CachedPrefix([], []) for _ in prompts]
        layers = output[self._cache_arg].layers
        prompt_positions = mask_BL[:, : width_c + width_s]
        caches = []
        for b, prompt in enumerate(prompts):
            kept = min(len(tokens[b]), forwarded)
            index = torch.cat(
                [
                    prompt_positions[b].nonzero()[:, 0],
                    torch.arange(width_c + width_s, width_c + width_s + kept, device=device),
                ]
            )
            caches.append(
                CachedPrefix(
                    prompt + tokens[b][:kept],
                    [(layer.keys[b][:, index], layer.values[b][:, index]) for layer in layers],
                )
            )
        return samples, caches

    def _batch_cache(
        self, reuse: list[CachedPrefix | None], cached: list[int], width: int, device: Any
    ) -> Any:
        """The rows' caches left-padded to ``width`` as one DynamicCache (None: nothing cached)."""
        if width == 0:
            return None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        sample = next(c for c in reuse if c is not None)
        for layer, (keys_HLD, _) in enumerate(sample.layers):
            heads, _, dim = keys_HLD.shape
            keys_BHLD = keys_HLD.new_zeros((len(reuse), heads, width, dim))
            values_BHLD = keys_BHLD.clone()
            for b, (c, n) in enumerate(zip(reuse, cached, strict=True)):
                if c is not None:
                    keys_BHLD[b, :, width - n :] = c.layers[layer][0]
                    values_BHLD[b, :, width - n :] = c.layers[layer][1]
            cache.update(keys_BHLD.to(device), values_BHLD.to(device), layer)
        return cache


def episode_seed(seed: int, key: Hashable) -> int:
    """The seed of an episode's random generator: a stable hash (crc32 of the repr, the
    same in every process, unlike hash()) of the generator's seed and the episode key."""
    return zlib.crc32(repr((seed, key)).encode())


def _cache_argument(model: Any) -> str:
    """The name under which the model's forward takes a KV cache, and returns it.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns
    and goes away in 5.40); earlier releases know only the old name.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _shared_prefix(cache: CachedPrefix | None, prompt: list[int]) -> CachedPrefix | None:
    """The part of ``cache`` that ``prompt`` starts with (None: nothing), short of all of it.

    An episode's next prompt usually extends its cache; where it does not (its history
    shows another response than the one sampled, as when the expert acted instead),
    the keys and values up to the first differing token still hold.
    """
    if cache is None:
        return None
    limit = min(len(cache.ids), len(prompt) - 1)  # leave a token to forward
    n = 0
    while n < limit and cache.ids[n] == prompt[n]:
        n += 1
    if n == len(cache.ids):
        return cache
    if n == 0:
        return None
    return CachedPrefix(cache.ids[:n], [(k[:, :n], v[:, :n]) for k, v in cache.layers])


Policy = Callable[[list[int]], Awaitable[Sample]]


def _tracking(policy: Policy | BatchedGenerator, *name: Hashable) -> tuple[Policy, Any]:
    """The policy's generate function, and a context that counts the episode in flight.

    With a BatchedGenerator the episode's key (its KV cache between turns, its random
    generator) comes from ``name``, so the episode samples the same tokens in any run."""
    if isinstance(policy, BatchedGenerator):
        key = policy.episode_key(*name)
        return functools.partial(policy.generate, key=key), policy.episode(key)
    return policy, contextlib.nullcontext()


async def run_episode(
    env: EnvClient,
    policy: Policy | BatchedGenerator,
    renderer: ChatRenderer,
    split: Split,
    task_id: int,
    agent: AgentSpec = DEFAULT_AGENT,
    end_after_failures: int | None = None,
) -> EpisodeRecord:
    """Play one task with ``policy`` until done, as ``agent`` says (its environment,
    history and turn limit); close the session.

    ``policy``: a BatchedGenerator (the episode is counted in flight, so batches wait
    for it) or any async function from prompt ids to a sample.
    ``end_after_failures``: end the episode (lost) once that many turns in a row failed.
    """
    generate, in_flight = _tracking(policy, agent.env, split, task_id)
    student = StudentAgent(generate, renderer, split, task_id, agent.history, end_after_failures)
    async with in_flight:
        last = await play_episode(env, Task(agent.env, split, task_id, agent.max_turns), student)
    assert student.record is not None
    student.record.won = last.won
    return student.record


@dataclass
class StudentAgent:
    """A model acting from prompts rendered from its episode so far; it keeps the
    episode's record (each turn's prompt, sampled tokens and their log-probs)."""

    generate: Policy
    renderer: ChatRenderer
    split: Split
    task_id: int
    history: History = None
    end_after_failures: int | None = None
    record: EpisodeRecord | None = None
    turn: TurnRecord | None = None

    async def begin(self, env: EnvClient, session: SessionCreated) -> None:
        task = session.task
        self.record = EpisodeRecord(
            self.split, self.task_id, task.goal, task.task_type, env=task.env
        )

    async def act(self, state: StepResult) -> str | None:
        assert self.record is not None
        prompt = self.renderer.prompt(
            self.record.task,
            self.record.episode_turns(),
            state.observation,
            state.admissible_actions,
            self.history,
        )
        sample = await self.generate(prompt)
        text = self.renderer.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        action = parse_action(text)
        self.turn = TurnRecord(
            observation=state.observation,
            admissible_actions=state.admissible_actions,
            prompt_ids=prompt,
            response_ids=sample.token_ids,
            sampling_logprobs=sample.logprobs,
            action=action,
            admissible=action in state.admissible_actions,
        )
        # An unreadable response still costs a turn: the environment sees no action.
        return action or ""

    async def after(self, action: str, result: StepResult) -> bool:
        assert self.record is not None and self.turn is not None
        turn, turns = self.turn, self.record.turns
        turn.feedback = result.observation
        last = turns[-1] if turns else None
        turn.repeated = last is not None and (last.action, last.feedback) == (
            turn.action,
            turn.feedback,
        )
        turns.append(turn)
        k = self.end_after_failures
        return bool(k) and len(turns) >= k and all(t.failed for t in turns[-k:])


async def run_episodes(
    env: EnvClient,
    policy: Policy | BatchedGenerator,
    renderer: ChatRenderer,
    split: Split,
    task_ids: list[int],
    agent: AgentSpec = DEFAULT_AGENT,
    concurrency: int = 64,
    progress: bool = False,
) -> list[EpisodeRecord]:
    """Play ``task_ids`` with up to ``concurrency`` episodes in flight; keep their order."""
    return await play_many(
        lambda t: run_episode(env, policy, renderer, split, t, agent),
        task_ids,
        concurrency,
        f"episodes on {split}",
        progress,
    )
