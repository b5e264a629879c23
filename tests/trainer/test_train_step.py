"""One training step on a hand-made batch: forced labels, pieces, top-k and PPO substeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer, agent_response
from client.protocol import ModelRef
from trainer import train as train_module
from trainer.config import LossConfig, TrainConfig
from trainer.rollout import EpisodeRecord, TurnRecord
from trainer.sft import make_optimizer
from trainer.train import (
    SupervisedEpisode,
    build_batch,
    forced_label,
    student_token_outputs,
    train_on_batch,
)


def turn(
    tokenizer, action: str | None, admissible: bool = True, feedback: str = "ok"
) -> TurnRecord:  # noqa: ANN001
    ids = tokenizer.encode(agent_response(action or "???"), add_special_tokens=False)
    ids.append(tokenizer.eos_token_id)
    return TurnRecord(
        observation="You arrive at cabinet 1.",
        admissible_actions=["look", "go to cabinet 2"],
        prompt_ids=[],
        response_ids=ids,
        sampling_logprobs=[-1.0] * len(ids),
        action=action,
        feedback=feedback,
        admissible=admissible,
    )


def test_forced_strong_rules() -> None:
    base = TurnRecord("o", [], [], [1], [-1.0], "look", "ok", admissible=True)
    assert not forced_label(base, repeated_is_strong=False)
    assert forced_label(TurnRecord("o", [], [], [1], [-1.0], None, "ok"), False)  # no action
    assert forced_label(TurnRecord("o", [], [], [1], [-1.0], "fly", "ok", admissible=False), False)
    assert forced_label(
        TurnRecord("o", [], [], [1], [-1.0], "look", "Nothing happens.", admissible=True), False
    )
    repeated = TurnRecord("o", [], [], [1], [-1.0], "look", "ok", admissible=True, repeated=True)
    assert not forced_label(repeated, repeated_is_strong=False)
    assert forced_label(repeated, repeated_is_strong=True)


def supervised(tokenizer, labels: list[str], top_k: int = 0) -> SupervisedEpisode:  # noqa: ANN001
    record = EpisodeRecord("train", 0, "put a mug in cabinet.", "pick_and_place")
    record.turns = [turn(tokenizer, "look"), turn(tokenizer, "go to cabinet 2")]
    vocab = len(tokenizer)
    topk_ids = topk_logprobs = None
    if top_k:
        topk_ids = [
            [[(i * 7 + k) % vocab for k in range(top_k)] for i, _ in enumerate(t.response_ids)]
            for t in record.turns
        ]
        topk_logprobs = [
            [[-1.0 - k for k in range(top_k)] for _ in t.response_ids] for t in record.turns
        ]
    return SupervisedEpisode(
        record=record,
        labels=labels,  # type: ignore[arg-type]
        forced=[False, False],
        teacher_logprobs=[[-0.5] * len(t.response_ids) for t in record.turns],
        teacher_top1=[[0.8] * len(t.response_ids) for t in record.turns],
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        model=ModelRef(name="t", revision="r"),
        tokens_forwarded=10,
    )


def setup(tiny_model_dir: Path, lr: float = 1e-3):  # noqa: ANN201
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = make_optimizer(model, lr, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return tokenizer, model, optimizer, scheduler


def test_an_all_skip_batch_trains_nothing_and_says_skipped(tiny_model_dir: Path) -> None:
    tokenizer, model, optimizer, scheduler = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir))
    batch = build_batch(ChatRenderer(tokenizer), [supervised(tokenizer, ["Skip", "Skip"])], config)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
    assert metrics["skipped"] == 1.0 and metrics["loss"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "loss", [LossConfig(kind="sage", top_k=3), LossConfig(kind="opd", substeps=2)]
)
def test_top_k_and_ppo_substeps_train(tiny_model_dir: Path, loss: LossConfig) -> None:
    tokenizer, model, optimizer, scheduler = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir), loss=loss)
    episode = supervised(tokenizer, ["Weak", "Strong"], top_k=loss.top_k)
    batch = build_batch(ChatRenderer(tokenizer), [episode], config)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_forwarding_in_pieces_gives_the_gradient_of_one_forward(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer, _, _, _ = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir), loss=LossConfig(kind="sage"))
    episodes = [
        supervised(tokenizer, ["Weak", "Strong"]),
        supervised(tokenizer, ["Strong", "Skip"]),
    ]
    batch = build_batch(ChatRenderer(tokenizer), episodes, config)
    grads = []
    for limit in (1_000_000, 1):  # one piece, then one context per piece
        monkeypatch.setattr(train_module, "MAX_FORWARD_TOKENS", limit)
        _, model, optimizer, scheduler = setup(tiny_model_dir, lr=0.0)  # gradients only
        model.train()
        train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert len(train_module._pieces(batch)) == len(batch.contexts) == 2
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_recomputed_logprobs_follow_the_flat_token_order(tiny_model_dir: Path) -> None:
    tokenizer, model, _, _ = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir), history=1)  # one context per turn
    batch = build_batch(
        ChatRenderer(tokenizer), [supervised(tokenizer, ["Weak", "Strong"])], config
    )
    with torch.no_grad():
        logprobs_N, _ = student_token_outputs(model, batch.contexts, tokenizer.pad_token_id, False)
        expected = []
        for context in batch.contexts:
            logits = model(torch.tensor([context.input_ids])).logits[0]
            lp = torch.log_softmax(logits, -1)
            for start, end in context.spans:
                expected += [lp[p - 1, context.input_ids[p]].item() for p in range(start, end)]
    assert len(batch.contexts) == 2 and batch.turn_N.tolist() == sorted(batch.turn_N.tolist())
    assert torch.allclose(logprobs_N, torch.tensor(expected), atol=1e-5)


def test_off_policy_sft_minimises_the_mean_negative_log_likelihood(tiny_model_dir: Path) -> None:
    tokenizer, model, optimizer, scheduler = setup(tiny_model_dir, lr=1e-2)
    config = TrainConfig(student="s", sft_policy="p", loss=LossConfig(kind="sft"))
    batch = build_batch(ChatRenderer(tokenizer), [supervised(tokenizer, ["Strong"] * 2)], config)
    with torch.no_grad():
        before_N, _ = student_token_outputs(model, batch.contexts, tokenizer.pad_token_id, False)
    metrics = train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(float(-before_N.mean()), rel=1e-5)
    with torch.no_grad():
        after_N, _ = student_token_outputs(model, batch.contexts, tokenizer.pad_token_id, False)
    assert after_N.mean() > before_N.mean()  # the imitated tokens became likelier
