"""Teacher-forced scoring: a turn counts exactly when the greedy answer is the expert's."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from client.prompts import ChatRenderer
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from trainer.config import LlamaShape, SFTConfig
from trainer.data import agent_sequences, corpus
from trainer.evaluate import teacher_forced
from trainer.models import AgentSpec, build_llama, fit_tokenizer
from trainer.prepare import expert_episodes
from trainer.sft import sft


def test_teacher_forced_scores_each_turn_of_the_experts_episodes(serve) -> None:
    url = serve(create_env_app(EnvSettings()))
    episodes = asyncio.run(expert_episodes(url, "valid_unseen", 2, AgentSpec()))
    assert [e.split for e in episodes] == ["valid_unseen"] * 2 and all(e.won for e in episodes)
    tokenizer = fit_tokenizer(corpus(episodes), 600)
    renderer = ChatRenderer(tokenizer, show_admissible=False)
    torch.set_num_threads(1)
    model = build_llama(tokenizer, LlamaShape(hidden=64, layers=2, intermediate=128), seed=0)
    turns = sum(len(e.steps) for e in episodes)
    verbs = {s.action.split()[0] for e in episodes for s in e.steps}

    untrained = teacher_forced(model, renderer, episodes, history=None)
    assert untrained.turns == turns and set(untrained.by_verb) == verbs
    assert untrained.exact == 0.0 and untrained.episodes_exact == 0.0

    # Learned by heart, the first episode is answered exactly on every turn...
    first = episodes[0]
    config = SFTConfig(epochs=150, batch_tokens=4096, lr=3e-3, warmup_steps=5)
    sft(
        model,
        agent_sequences(renderer, [first], None),
        config,
        tokenizer.pad_token_id,
        progress=False,
    )
    learned = teacher_forced(model, renderer, [first], history=None)
    assert learned.exact == 1.0 and learned.episodes_exact == 1.0

    # ... and a last turn whose expert said something else counts as missed, alone.
    last = dataclasses.replace(first.steps[-1], action="look", expert_action="look")
    changed = dataclasses.replace(first, steps=[*first.steps[:-1], last])
    scored = teacher_forced(model, renderer, [changed], history=None)
    n = len(first.steps)
    assert scored.exact == (n - 1) / n and scored.episodes_exact == 0.0
    assert scored.by_verb["look"] == 0.0
