"""Rollouts through the env service: batched generation, records, and aligned log-probs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.env import EnvClient
from client.prompts import ChatRenderer
from services.env.app import create_app
from services.env.settings import EnvSettings
from trainer.evaluate import summarize
from trainer.models import AgentSpec
from trainer.rollout import BatchedGenerator, run_episodes


@pytest.mark.parametrize("history", [None, 1])
async def test_recomputed_logprobs_of_sampled_tokens_match_the_sampling_logprobs(
    serve,
    tiny_model_dir: Path,
    history: int | None,
) -> None:
    url = serve(create_app(EnvSettings()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    renderer = ChatRenderer(tokenizer)
    async with (
        EnvClient(url) as env,
        BatchedGenerator(model, tokenizer, max_new_tokens=8, temperature=1.0, seed=0) as generator,
    ):
        episodes = await run_episodes(
            env, generator, renderer, "train", [0, 1, 2, 3], AgentSpec(history=history, max_turns=3)
        )
    assert max(generator.batches) > 1  # episodes waiting together were generated together
    compared = 0
    for episode in episodes:
        assert len(episode.turns) == 3 and not episode.won
        for context in renderer.contexts(episode.task, episode.episode_turns(), history):
            with torch.no_grad():
                logits = model(torch.tensor([context.input_ids])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for t, (start, end) in zip(context.turns, context.spans, strict=True):
                turn = episode.turns[t]
                assert context.input_ids[start:end] == turn.response_ids
                assert context.input_ids[:start] == turn.prompt_ids
                recomputed = [
                    logprobs[p - 1, context.input_ids[p]].item() for p in range(start, end)
                ]
                assert (
                    max(abs(a - b) for a, b in zip(recomputed, turn.sampling_logprobs, strict=True))
                    <= 1e-4
                )
                compared += end - start
    assert compared > 0


async def test_a_random_model_rarely_names_admissible_actions_and_the_summary_says_so(
    serve,
    tiny_model_dir: Path,
) -> None:
    url = serve(create_app(EnvSettings()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    async with (
        EnvClient(url) as env,
        BatchedGenerator(model, tokenizer, temperature=0.0) as generator,
    ):
        episodes = await run_episodes(
            env, generator, ChatRenderer(tokenizer), "valid_seen", [0, 1], AgentSpec(max_turns=2)
        )
    result = summarize("valid_seen", episodes)
    assert result.episodes == 2 and result.avg_turns == 2.0 and result.success == 0.0
    assert result.invalid_rate == 1.0  # an untrained model names no admissible action
    # Greedy and unchanged: the second turn repeats the first's (empty) action and feedback.
    assert result.repeated_rate == 0.5


async def test_reusing_each_episodes_cache_between_turns_changes_nothing_but_the_cost(
    serve,
    tiny_model_dir: Path,
) -> None:
    url = serve(create_app(EnvSettings()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    played, forwarded = [], []
    for reuse in (False, True):
        async with (
            EnvClient(url) as env,
            BatchedGenerator(
                model, tokenizer, max_new_tokens=6, temperature=0.0, reuse_cache=reuse
            ) as generator,
        ):
            episodes = await run_episodes(
                env, generator, ChatRenderer(tokenizer), "train", [0, 1, 2], AgentSpec(max_turns=4)
            )
        played.append(episodes)
        forwarded.append(generator.prompt_tokens_forwarded)
    for fresh, cached in zip(*played, strict=True):
        assert [t.response_ids for t in fresh.turns] == [t.response_ids for t in cached.turns]
        for a, b in zip(fresh.turns, cached.turns, strict=True):
            assert (
                max(
                    abs(x - y)
                    for x, y in zip(a.sampling_logprobs, b.sampling_logprobs, strict=True)
                )
                < 1e-4
            )
    # Turns after the first forward only their new tokens: the response before the last
    # sampled token is cached, so each later turn forwards that token and the observation.
    full = sum(len(t.prompt_ids) for e in played[0] for t in e.turns)
    assert forwarded[0] == full
    first_turns = sum(len(e.turns[0].prompt_ids) for e in played[1])
    later = sum(
        len(t.prompt_ids) - len(prev.prompt_ids) - len(prev.response_ids) + 1
        for e in played[1]
        for prev, t in itertools.pairwise(e.turns)
    )
    assert forwarded[1] == first_turns + later < full


def test_a_cache_is_reused_up_to_where_the_prompt_departs_from_it(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = BatchedGenerator(model, tokenizer, max_new_tokens=4, temperature=0.0)
    shared = tokenizer.encode("You arrive at cabinet 1. The cabinet 1 is closed.")
    first = shared + tokenizer.encode(" go to fridge 1")
    second = shared + tokenizer.encode(" open cabinet 1")  # another response than cached
    (_,), (cache,) = generator.generate_now([first])
    (fresh,), _ = BatchedGenerator(
        model, tokenizer, max_new_tokens=4, temperature=0.0
    ).generate_now([second])
    before = generator.prompt_tokens_forwarded
    (reused,), _ = generator.generate_now([second], [cache])
    # Only the tokens after the shared part are forwarded, and the answer is the same.
    assert generator.prompt_tokens_forwarded - before == len(second) - len(shared)
    assert reused.token_ids == fresh.token_ids
    assert max(abs(a - b) for a, b in zip(reused.logprobs, fresh.logprobs, strict=True)) < 1e-4


async def test_a_prompt_left_unanswered_fails_loudly(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = BatchedGenerator(model, tokenizer, answer_timeout_s=0.2)
    # Not entered: no loop answers, as if it had stopped.
    with pytest.raises(TimeoutError, match="no generation for a prompt after"):
        await generator.generate([1, 2, 3])


async def test_a_training_episode_ends_after_the_given_failures_in_a_row(
    serve,
    tiny_model_dir: Path,
) -> None:
    from trainer.rollout import Sample, run_episode

    url = serve(create_app(EnvSettings()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    # Looks once (admissible, it works), then flies (not an action of this world).
    said = itertools.chain(["Action: look"], itertools.repeat("Action: fly away"))

    async def policy(prompt: list[int]) -> Sample:
        ids = tokenizer.encode(next(said), add_special_tokens=False) + [tokenizer.eos_token_id]
        return Sample(ids, [0.0] * len(ids))

    async with EnvClient(url) as env:
        ten = AgentSpec(max_turns=10)
        cut = await run_episode(env, policy, renderer, "train", 0, ten, end_after_failures=3)
        said = itertools.chain(["Action: look"], itertools.repeat("Action: fly away"))
        full = await run_episode(env, policy, renderer, "train", 0, ten)
    assert [t.failed for t in cut.turns] == [False, True, True, True] and not cut.won
    assert len(full.turns) == 10
