"""Prompt rendering: the agent's prompts, episode layouts and judge prompts, from one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from client.prompts import ChatRenderer, agent_response, parse_action
from client.protocol import EpisodeTurn


@pytest.fixture(scope="module")
def renderer(tiny_model_dir: Path) -> ChatRenderer:
    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir))


def turns_for(renderer: ChatRenderer, actions: list[str]) -> list[EpisodeTurn]:
    tokenizer = renderer.tokenizer
    return [
        EpisodeTurn(
            observation=f"You arrive at drawer {i + 1}.",
            admissible_actions=["look", f"go to drawer {i + 2}"],
            response_ids=tokenizer.encode(agent_response(a), add_special_tokens=False)
            + [renderer.eos_id],
            feedback=f"You arrive at drawer {i + 2}.",
        )
        for i, a in enumerate(actions)
    ]


@pytest.mark.parametrize("history", [None, 0, 1, 2])
def test_each_prompt_is_exactly_the_context_its_response_is_scored_in(
    renderer: ChatRenderer, history: int | None
) -> None:
    turns = turns_for(renderer, ["go to drawer 2", "look", "go to drawer 4", "look"])
    contexts = renderer.contexts("put a pen in drawer.", turns, history)
    by_turn = {t: (c, i) for c in contexts for i, t in enumerate(c.turns)}
    for t, turn in enumerate(turns):
        prompt = renderer.prompt(
            "put a pen in drawer.", turns[:t], turn.observation, turn.admissible_actions, history
        )
        context, i = by_turn[t]
        start, end = context.spans[i]
        assert context.input_ids[:start] == prompt
        assert context.input_ids[start:end] == turn.response_ids


def test_a_window_restates_the_task_and_drops_older_turns(renderer: ChatRenderer) -> None:
    turns = turns_for(renderer, ["go to drawer 2", "look", "go to drawer 4"])
    text = renderer.tokenizer.decode(renderer.prompt("put a pen in drawer.", turns, "obs", [], 1))
    assert "Task: put a pen in drawer." in text
    assert "drawer 3." in text and "drawer 2." not in text


def test_the_judge_prompt_ends_with_the_feedback_question_and_cue(renderer: ChatRenderer) -> None:
    turns = turns_for(renderer, ["go to drawer 2"])
    text = renderer.tokenizer.decode(renderer.judge_prompt("put a pen in drawer.", turns))
    assert text.endswith("<|im_start|>assistant\nVerdict:")
    assert "Feedback: You arrive at drawer 2." in text
    assert text.count("<|im_end|>") == 4  # system, user, the response's own eos, judge question


def test_actions_are_parsed_from_the_last_action_line() -> None:
    assert parse_action("Thought: find it\nAction: go to drawer 1") == "go to drawer 1"
    assert parse_action("Action: look\nAction:  open fridge 1 ") == "open fridge 1"
    assert parse_action("go to drawer 1") is None and parse_action("Action:") is None


@pytest.mark.parametrize(
    ("text", "action_text"),
    [
        ("Thought: apple not here\nAction: go to fridge 1", "Action: go to fridge 1"),
        ("Action: look", "Action: look"),
        ("Thought: a\nAction: look\nAction: go to desk 1", "Action: go to desk 1"),
        ("Thought: I am lost", "Thought: I am lost"),  # no action line: all of it
    ],
)
def test_action_start_is_the_first_token_of_the_last_action_line(
    renderer: ChatRenderer, text: str, action_text: str
) -> None:
    from client.prompts import action_start

    tokenizer = renderer.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False) + [renderer.eos_id]
    start = action_start(tokenizer, ids)
    assert tokenizer.decode(ids[start:], skip_special_tokens=True).strip() == action_text
