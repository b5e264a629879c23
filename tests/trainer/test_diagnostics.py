"""The search-decision diagnostics: which turns are decisions, their kinds, and the
teacher's log-probs at the decision token, read through the teacher service."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer
from client.teacher import TeacherClient
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.diagnostics import decision_stats, decisions_in
from trainer.models import AgentSpec
from trainer.rollout import EpisodeRecord, TurnRecord

COUNTER = "On the countertop 1, you see a apple 2, and a mug 1."
CABINET = "On the cabinet 1, you see a mug 3."


def episode(tokenizer, turns: list[tuple[str, str]]) -> EpisodeRecord:
    """An episode of (observation, response text) turns."""
    record = EpisodeRecord("valid_seen", 0, "put some apple on table.", "pick_and_place")
    for observation, text in turns:
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        record.turns.append(
            TurnRecord(observation, [], [], ids, [0.0] * len(ids), None, "Nothing happens.")
        )
    return record


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_decisions_are_search_thoughts_of_two_kinds(tokenizer) -> None:
    record = episode(
        tokenizer,
        [
            ("You are in the middle of a room.", "Action: go to countertop 1"),  # no thought
            (COUNTER, "Thought: apple not here\nAction: go to cabinet 1"),  # in view, says not
            ("Nothing happens.", "Thought: apple 2 here\nAction: take apple 2 from countertop 1"),
            (CABINET, "Thought: apple not here\nAction: go to fridge 1"),  # not in view
            (CABINET, "Thought: apple 3 here\nAction: take apple 3 from cabinet 1"),
        ],
    )
    decisions = decisions_in([record], tokenizer)
    # After "Nothing happens." the countertop's contents are still in view.
    assert [(d.turn, d.kind, d.said_not) for d in decisions] == [
        (1, "in_view", True),
        (2, "in_view", False),
        (3, "not_in_view", True),
        (4, "not_in_view", False),
    ]
    assert decisions[0].numbers_in_view == (2,) and decisions[0].sought == "apple"
    head = tokenizer.decode(record.turns[1].response_ids[: decisions[0].prefix_len])
    assert head == "Thought: apple"


def test_the_decision_style_thought_is_read_too(tokenizer) -> None:
    record = episode(tokenizer, [(COUNTER, "Thought: apple here\nAction: take apple 2 from x")])
    [decision] = decisions_in([record], tokenizer)
    assert decision.kind == "in_view" and not decision.said_not


async def test_teacher_logprobs_are_those_of_its_own_forward_at_the_decision(
    serve,
    tiny_model_dir: Path,
    tokenizer,
) -> None:
    record = episode(
        tokenizer,
        [
            (COUNTER, "Thought: apple not here\nAction: go to cabinet 1"),
            (CABINET, "Thought: apple 1 here\nAction: take apple 1 from cabinet 1"),
        ],
    )
    url = serve(create_teacher_app(TeacherSettings(model=str(tiny_model_dir), max_wait_ms=2.0)))
    renderer = ChatRenderer(tokenizer)
    async with TeacherClient(url) as teacher:
        stats = await decision_stats([record], renderer, teacher, AgentSpec())
    assert stats.count == {"in_view": 1, "not_in_view": 1}
    assert stats.says_not == {"in_view": 1.0, "not_in_view": 0.0}

    # By hand: the teacher's forward over the context, the response cut after "apple".
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    turns = record.episode_turns()[:1]
    head = turns[0].response_ids[:3]
    assert tokenizer.decode(head) == "Thought: apple"

    def logprob(token_text: str) -> float:
        token = tokenizer.encode(token_text, add_special_tokens=False)
        cut = turns[0].model_copy(update={"response_ids": head + token, "feedback": ""})
        rendered = renderer.episode(record.task, [cut])
        end = rendered.spans[-1][1]
        with torch.no_grad():
            logits = model(torch.tensor([rendered.input_ids[:end]])).logits[0, -2]
        return torch.log_softmax(logits, -1)[token[0]].item()

    in_view = stats.teacher["in_view"]
    assert set(in_view) == {"right", "wrong", "not"}
    assert in_view["right"] == pytest.approx(logprob(" 2"), abs=1e-4)
    assert in_view["wrong"] == pytest.approx(logprob(" 1"), abs=1e-4)
    assert in_view["not"] == pytest.approx(logprob(" not"), abs=1e-4)
    assert set(stats.teacher["not_in_view"]) == {"wrong", "not"}  # nothing right to name
    assert stats.teacher_says_not == float(in_view["not"] > in_view["right"])
    metrics = stats.as_metrics("diag_valid_seen")
    assert metrics["diag_valid_seen_in_view_says_not"] == 1.0
    assert metrics["diag_valid_seen_in_view_teacher_lp_right"] == in_view["right"]
