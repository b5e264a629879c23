"""One training step on a hand-made batch: forced labels, pieces, divergences, PPO substeps,
and the loss it applies, which is trainer/losses.py's multi_turn_loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer, agent_response
from client.protocol import ModelRef
from trainer import update as update_module
from trainer.config import LossConfig, TrainConfig
from trainer.losses import multi_turn_loss
from trainer.rollout import BatchedGenerator, EpisodeRecord, TurnRecord
from trainer.sft import Example, make_optimizer
from trainer.supervision import SupervisedEpisode, forced_label, switches_of
from trainer.update import build_batch, student_token_outputs, train_on_batch


def turn(
    tokenizer, action: str | None, admissible: bool = True, feedback: str = "ok"
) -> TurnRecord:
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


def supervised(tokenizer, labels: list[str], top_k: int = 0) -> SupervisedEpisode:
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


def setup(tiny_model_dir: Path, lr: float = 1e-3):
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
    "loss",
    [
        LossConfig(kind="sage", divergence="reverse_kl", top_k=3),
        LossConfig(kind="opd", divergence="forward_kl", top_k=3),
        LossConfig(kind="opd", substeps=2),
    ],
)
def test_divergences_and_ppo_substeps_train(tiny_model_dir: Path, loss: LossConfig) -> None:
    tokenizer, model, optimizer, scheduler = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir), loss=loss)
    episode = supervised(tokenizer, ["Weak", "Strong"], top_k=loss.top_k + 1)  # cut to top_k
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
        monkeypatch.setattr(update_module, "MAX_FORWARD_TOKENS", limit)
        _, model, optimizer, scheduler = setup(tiny_model_dir, lr=0.0)  # gradients only
        model.train()
        train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert len(update_module._pieces(batch)) == len(batch.contexts) == 2
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_recomputed_logprobs_follow_the_flat_token_order(tiny_model_dir: Path) -> None:
    tokenizer, model, _, _ = setup(tiny_model_dir)
    config = TrainConfig(student=str(tiny_model_dir), history=1)  # one context per turn
    batch = build_batch(
        ChatRenderer(tokenizer), [supervised(tokenizer, ["Weak", "Strong"])], config
    )
    with torch.no_grad():
        logprobs_N, _ = student_token_outputs(
            model, batch.contexts, tokenizer.pad_token_id, 1.0, False
        )
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
        before_N, _ = student_token_outputs(
            model, batch.contexts, tokenizer.pad_token_id, 1.0, False
        )
    metrics = train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(float(-before_N.mean()), rel=1e-5)
    with torch.no_grad():
        after_N, _ = student_token_outputs(
            model, batch.contexts, tokenizer.pad_token_id, 1.0, False
        )
    assert after_N.mean() > before_N.mean()  # the imitated tokens became likelier


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(kind="opd"),
        LossConfig(kind="sage", alpha=0.3),
        LossConfig(kind="sage", divergence="forward_kl", top_k=3),
        LossConfig(kind="sage", divergence="jsd", jsd_beta=0.3, top_k=3),
        LossConfig(kind="opd", divergence="reverse_kl", top_k=3),
    ],
)
def test_the_step_applies_multi_turn_loss(
    tiny_model_dir: Path, loss: LossConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What trains is what the loss tests specify: the step's gradient, forwarded in
    pieces, is the gradient of losses.multi_turn_loss over the whole batch at once."""
    tokenizer, _, _, _ = setup(tiny_model_dir)
    # No clipping: the step's gradients stay as the loss made them.
    config = TrainConfig(student=str(tiny_model_dir), temperature=0.7, grad_clip=1e9, loss=loss)
    episodes = [
        supervised(tokenizer, ["Weak", "Strong"], top_k=4),
        supervised(tokenizer, ["Strong", "Skip"], top_k=4),
    ]
    batch = build_batch(ChatRenderer(tokenizer), episodes, config)
    monkeypatch.setattr(update_module, "MAX_FORWARD_TOKENS", 1)  # a piece per context
    _, model, optimizer, scheduler = setup(tiny_model_dir, lr=0.0)
    model.train()
    metrics = train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
    stepped = torch.cat([p.grad.flatten() for p in model.parameters()])

    _, reference, _, _ = setup(tiny_model_dir, lr=0.0)
    reference.train()
    logprobs_N, logprobs_NV = student_token_outputs(
        reference, batch.contexts, tokenizer.pad_token_id, 0.7, True
    )
    targets = batch.targets
    out = multi_turn_loss(
        logprobs_N,
        targets.old_logprobs_N,
        targets.teacher_logprobs_N,
        batch.confidence_T[batch.turn_N],  # c_t on each of its tokens
        batch.turn_N,
        batch.labels,
        switches_of(loss),
        logprobs_NV,
        targets.topk_ids_NK,
        targets.topk_logprobs_NK,
    )
    out.loss.backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["kl_estimate"] == pytest.approx(out.kl_estimate)
    assert torch.allclose(stepped, expected, atol=1e-6)
    assert stepped.abs().sum() > 0


def test_logprobs_at_the_sampling_temperature_match_the_generator(
    tiny_model_dir: Path,
) -> None:
    """At T != 1 the recomputed log-probs are those of softmax(logits / T), which
    sampled the tokens: the first substep's PPO ratio is 1, the update on-policy."""
    tokenizer, model, _, _ = setup(tiny_model_dir)
    model.eval()
    renderer = ChatRenderer(tokenizer)
    prompt = renderer.prompt("put a mug in cabinet.", [], "You arrive at cabinet 1.", ["look"])
    generator = BatchedGenerator(model, tokenizer, max_new_tokens=8, temperature=0.4, seed=3)
    [sample], _ = generator.generate_now([prompt])
    context = Example(
        prompt + sample.token_ids, [(len(prompt), len(prompt) + len(sample.token_ids))]
    )
    with torch.no_grad():
        at_t, _ = student_token_outputs(model, [context], tokenizer.pad_token_id, 0.4, False)
        at_1, _ = student_token_outputs(model, [context], tokenizer.pad_token_id, 1.0, False)
    assert torch.allclose(at_t, torch.tensor(sample.logprobs), atol=1e-5)
    assert not torch.allclose(at_1, torch.tensor(sample.logprobs), atol=1e-3)


def test_action_tokens_only_trains_each_response_from_its_action_line(
    tiny_model_dir: Path,
) -> None:
    tokenizer, _, _, _ = setup(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    episode = supervised(tokenizer, ["Weak", "Strong"])
    thought = tokenizer.encode(agent_response("look", "mug not here"), add_special_tokens=False)
    turn = episode.record.turns[0]
    turn.response_ids = [*thought, tokenizer.eos_token_id]
    turn.sampling_logprobs = [-1.0] * len(turn.response_ids)
    episode.teacher_logprobs[0] = [-0.5] * len(turn.response_ids)
    episode.teacher_top1[0] = [0.8] * len(turn.response_ids)
    config = TrainConfig(student=str(tiny_model_dir), loss=LossConfig(tokens="action"))
    batch = build_batch(renderer, [episode], config)
    [context] = batch.contexts
    trained = [
        tokenizer.decode(context.input_ids[a:b], skip_special_tokens=True) for a, b in context.spans
    ]
    assert [text.strip() for text in trained] == ["Action: look", "Action: go to cabinet 2"]
    assert len(batch.turn_N) == sum(b - a for a, b in context.spans)
    whole = build_batch(renderer, [episode], TrainConfig(student=str(tiny_model_dir)))
    assert len(whole.turn_N) > len(batch.turn_N)  # the thought is trained only with "all"
