"""The losses against values computed by hand on small tensors (docs/method.md's symbols)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import LossSwitches, full_divergence, multi_turn_loss

# Two turns: turn 0 has tokens 0-1, turn 1 has token 2.
TURN = torch.tensor([0, 0, 1])
STUDENT = [-1.0, -2.0, -0.5]  # log pi_S(y)
TEACHER = [-0.5, -3.0, -0.1]  # log pi_T(y)
TOP1 = [0.8, 0.6, 0.9]  # teacher's top-1 probability
A = [t - s for t, s in zip(TEACHER, STUDENT, strict=True)]  # 0.5, -1.0, 0.4


def run(labels: list[str], switches: LossSwitches, student: list[float] = STUDENT):
    logprobs = torch.tensor(student, requires_grad=True)
    out = multi_turn_loss(
        logprobs,
        logprobs.detach(),
        torch.tensor(TEACHER),
        torch.tensor(TOP1),
        TURN,
        labels,
        switches,
    )
    return out, logprobs


def test_opd_is_minus_advantage_times_logprob_over_tokens() -> None:
    out, _ = run(["Strong", "Skip"], LossSwitches.opd())
    # With r = 1, the PPO form equals -A (its value); its gradient is -A per token / N.
    expected = sum(-a for a in A) / 3
    assert out.loss.item() == pytest.approx(expected)
    assert out.kl_estimate == pytest.approx(-sum(A) / 3)  # mean log pi_S - log pi_T


def test_opd_gradient_is_minus_advantage_over_n_tokens() -> None:
    out, logprobs = run(["Skip", "Skip"], LossSwitches.opd())
    out.loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-a / 3 for a in A])


def test_sage_weights_turns_by_intervention_times_confidence_normalised() -> None:
    out, logprobs = run(["Weak", "Strong"], LossSwitches(alpha=0.5))
    c0, c1 = (0.8 + 0.6) / 2, 0.9
    s = [0.5 * c0, 0.5 * c0, 1.0 * c1]
    expected = sum(si * -a for si, a in zip(s, A, strict=True)) / sum(s)
    assert out.loss.item() == pytest.approx(expected)
    assert out.turn_scores.tolist() == pytest.approx([0.5 * c0, c1])
    out.loss.backward()
    assert logprobs.grad.tolist() == pytest.approx(
        [si * -a / sum(s) for si, a in zip(s, A, strict=True)]
    )


def test_sage_with_all_interventions_and_confidences_at_one_equals_opd() -> None:
    sage = LossSwitches(intervention=True, confidence=False, normalization=True)
    out_sage, grad_sage = run(["Strong", "Strong"], sage)
    out_opd, grad_opd = run(["Strong", "Strong"], LossSwitches.opd())
    out_sage.loss.backward()
    out_opd.loss.backward()
    assert out_sage.loss.item() == out_opd.loss.item()
    assert torch.equal(grad_sage.grad, grad_opd.grad)


@pytest.mark.parametrize(
    ("switches", "s"),
    [
        (LossSwitches(intervention=False), [0.7, 0.7, 0.9]),  # i = 1
        (LossSwitches(confidence=False), [0.0, 0.0, 1.0]),  # c = 1
    ],
)
def test_each_ablation_removes_its_factor(switches: LossSwitches, s: list[float]) -> None:
    out, _ = run(["Skip", "Strong"], switches)
    expected = sum(si * -a for si, a in zip(s, A, strict=True)) / sum(s)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)  # float32 arithmetic


def test_no_normalization_divides_by_the_token_count() -> None:
    out, _ = run(["Weak", "Strong"], LossSwitches(normalization=False, alpha=0.5))
    s = [0.5 * 0.7, 0.5 * 0.7, 0.9]
    assert out.loss.item() == pytest.approx(sum(si * -a for si, a in zip(s, A, strict=True)) / 3)


def test_normalization_keeps_the_mean_token_weight_at_one() -> None:
    out, _ = run(["Weak", "Strong"], LossSwitches(alpha=0.3))
    assert out.mean_token_weight == pytest.approx(1.0)
    assert run(["Weak", "Strong"], LossSwitches(normalization=False))[0].mean_token_weight < 1.0


def test_an_all_skip_batch_gives_zero_loss_no_nan_and_is_marked_skipped() -> None:
    out, logprobs = run(["Skip", "Skip"], LossSwitches())
    out.loss.backward()
    assert out.skipped and out.loss.item() == 0.0
    assert not torch.isnan(logprobs.grad).any() and logprobs.grad.abs().sum() == 0


def test_ppo_clip_stops_the_gradient_outside_the_trust_region() -> None:
    # The student moved far up on token 0 (ratio e^1 > 1.2) where A > 0: clipped, no gradient.
    logprobs = torch.tensor([0.0, -2.0, -0.5], requires_grad=True)
    old = torch.tensor(STUDENT)
    out = multi_turn_loss(
        logprobs,
        old,
        torch.tensor(TEACHER),
        torch.tensor(TOP1),
        TURN,
        ["Strong", "Strong"],
        LossSwitches.opd(),
    )
    out.loss.backward()
    assert logprobs.grad[0].item() == 0.0
    assert logprobs.grad[1].item() == pytest.approx(-A[1] / 3)  # inside: -A r / N


def test_gradients_reach_only_the_tokens_in_the_loss() -> None:
    vocab, hidden = 11, 4
    embedding = torch.nn.Embedding(vocab, hidden)
    head = torch.nn.Linear(hidden, vocab)
    ids = torch.tensor([3, 5, 7, 2, 9])
    trained = torch.tensor([False, False, True, True, False])  # prompt, response, context
    logits = head(embedding(ids))
    logprobs = torch.log_softmax(logits, -1)[:-1].gather(1, ids[1:, None])[:, 0]
    selected = logprobs[trained[1:]]
    out = multi_turn_loss(
        selected,
        selected.detach(),
        selected.detach() + 1.0,
        torch.full_like(selected, 0.5),
        torch.zeros(len(selected), dtype=torch.long),
        ["Strong"],
        LossSwitches(),
    )
    out.loss.backward()
    # Only the embeddings of the positions that predict trained tokens (1 and 2) get gradient.
    touched = embedding.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == sorted({ids[1].item(), ids[2].item()})


# One token over a vocabulary of 3; the teacher's top-2 are ids 0 and 2.
STUDENT_P = [0.5, 0.3, 0.2]
TEACHER_IDS = [[0, 2]]
TEACHER_P = [0.6, 0.1]  # tail 0.3
# Over the buckets (id 0, id 2, the rest): student 0.5, 0.2, 0.3; teacher 0.6, 0.1, 0.3.
S_BUCKETS, T_BUCKETS = [0.5, 0.2, 0.3], [0.6, 0.1, 0.3]


def divergence(kind: str, beta: float = 0.5) -> torch.Tensor:
    return full_divergence(
        torch.log(torch.tensor([STUDENT_P])),
        torch.tensor(TEACHER_IDS),
        torch.log(torch.tensor([TEACHER_P])),
        kind,  # type: ignore[arg-type]
        beta,
    )


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_reverse_kl_over_the_top_k_and_a_tail_bucket() -> None:
    expected = kl_by_hand(S_BUCKETS, T_BUCKETS)
    assert divergence("reverse_kl").item() == pytest.approx(expected, abs=1e-6)


def test_forward_kl_over_the_top_k_and_a_tail_bucket() -> None:
    expected = kl_by_hand(T_BUCKETS, S_BUCKETS)
    assert divergence("forward_kl").item() == pytest.approx(expected, abs=1e-6)


def test_generalized_jsd_mixes_teacher_and_student_by_beta() -> None:
    beta = 0.3
    mixture = [beta * t + (1 - beta) * s for s, t in zip(S_BUCKETS, T_BUCKETS, strict=True)]
    expected = beta * kl_by_hand(T_BUCKETS, mixture) + (1 - beta) * kl_by_hand(S_BUCKETS, mixture)
    assert divergence("jsd", beta).item() == pytest.approx(expected, abs=1e-6)


def test_forward_kl_gradient_pulls_the_student_toward_the_teacher() -> None:
    # d KL(T || S) / d logit_v = p_S(v) - p_T(v) over the full vocabulary (no tail here:
    # the top-k is the whole vocabulary).
    logits = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.7, 0.2, 0.1]])
    loss = full_divergence(
        torch.log_softmax(logits, -1), torch.tensor([[0, 1, 2]]), teacher.log(), "forward_kl"
    )
    loss.sum().backward()
    expected = torch.softmax(logits.detach(), -1) - teacher
    assert torch.allclose(logits.grad, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_every_divergence_is_zero_when_student_equals_teacher(kind: str) -> None:
    logprobs = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    value = full_divergence(logprobs, torch.tensor([[0, 1]]), logprobs[:, :2], kind)  # type: ignore[arg-type]
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_sage_weights_apply_to_any_divergence() -> None:
    # Two tokens, one per turn; turn 0 Skip, turn 1 Strong: only token 1's divergence counts.
    logprobs_NV = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))
    ids_NK = torch.tensor([[0, 2], [0, 2]])
    teacher_NK = torch.log(torch.tensor([[0.6, 0.1], [0.6, 0.1]]))
    out = multi_turn_loss(
        logprobs_NV[:, 0],
        logprobs_NV[:, 0],
        teacher_NK[:, 0],
        torch.tensor([0.9, 0.9]),
        torch.tensor([0, 1]),
        ["Skip", "Strong"],
        LossSwitches(divergence="forward_kl"),
        logprobs_NV,
        ids_NK,
        teacher_NK,
    )
    expected = kl_by_hand([0.6, 0.1, 0.3], [0.2, 0.6, 0.2])
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
