"""The losses of METHOD.md, symbol for symbol: standard multi-turn OPD and SAGE-OPD.

Shapes: every tensor is flat over the batch's trained tokens (suffix _N), with
``turn_N`` saying which turn each token belongs to; per-turn tensors have suffix _T.

    A_tj = sg( log pi_T(y) - log pi_S_old(y) )          teacher minus student (at sampling)
    l_tj = - A_tj * log pi_S(y)                          sampled-token reverse KL
         = - min(r A, clip(r, 1-eps, 1+eps) A),  r = pi_S / pi_S_old   (PPO substeps)
    L_OPD  = sum_tj l_tj / N_tok
    i_t    = 0 / alpha / 1 for Skip / Weak / Strong      turn-level intervention
    c_t    = sg( mean_j max_v pi_T(v | ctx) )            teacher confidence
    s_t    = i_t * c_t
    L_SAGE = sum_tj s_t l_tj / sum_tj s_t                loss normalization
           = sum_tj s_t l_tj / N_tok                     (ablation: no normalization)

The PPO form has the same gradient as -A log pi_S at r = 1 (the first substep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Label = Literal["Skip", "Weak", "Strong"]


@dataclass(frozen=True)
class LossSwitches:
    """Which parts of SAGE-OPD are on; all off is standard OPD."""

    intervention: bool = True  # i_t from the judge (off: i_t = 1)
    confidence: bool = True  # c_t from the teacher (off: c_t = 1)
    normalization: bool = True  # divide by sum s (off: by N_tok)
    alpha: float = 0.5  # i_t of a Weak turn
    ppo_clip: float = 0.2

    @classmethod
    def opd(cls) -> LossSwitches:
        return cls(intervention=False, confidence=False, normalization=False)


def intervention(labels: list[Label], alpha: float) -> torch.Tensor:
    """i_t per turn: Skip 0, Weak alpha, Strong 1."""
    value = {"Skip": 0.0, "Weak": alpha, "Strong": 1.0}
    return torch.tensor([value[label] for label in labels], dtype=torch.float32)


def turn_confidence(teacher_top1_N: torch.Tensor, turn_N: torch.Tensor, turns: int) -> torch.Tensor:
    """c_t: the mean over each turn's tokens of the teacher's top-1 probability."""
    sums_T = torch.zeros(turns).index_add_(0, turn_N, teacher_top1_N.float())
    counts_T = torch.zeros(turns).index_add_(0, turn_N, torch.ones_like(teacher_top1_N).float())
    return sums_T / counts_T.clamp(min=1)


def token_loss(
    student_logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor,
    teacher_logprobs_N: torch.Tensor,
    ppo_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """l_tj and A_tj for every trained token (l carries the gradient)."""
    advantage_N = (teacher_logprobs_N - old_logprobs_N).detach()
    ratio_N = torch.exp(student_logprobs_N - old_logprobs_N.detach())
    clipped_N = ratio_N.clamp(1 - ppo_clip, 1 + ppo_clip)
    loss_N = -torch.minimum(ratio_N * advantage_N, clipped_N * advantage_N)
    return loss_N, advantage_N


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    skipped: bool  # every turn had s_t = 0: no supervision, zero loss
    advantage_mean: float
    turn_scores: torch.Tensor  # s_t
    mean_token_weight: float  # average of the weights applied per token (1.0 for OPD)


def turn_scores(
    teacher_top1_N: torch.Tensor, turn_N: torch.Tensor, labels: list[Label], switches: LossSwitches
) -> torch.Tensor:
    """s_t = i_t * c_t for every turn (1 where a part is switched off)."""
    turns = len(labels)
    i_T = intervention(labels, switches.alpha) if switches.intervention else torch.ones(turns)
    c_T = (
        turn_confidence(teacher_top1_N, turn_N, turns).detach()
        if switches.confidence
        else torch.ones(turns)
    )
    return i_T * c_T


def token_weights(s_T: torch.Tensor, turn_N: torch.Tensor, switches: LossSwitches) -> torch.Tensor:
    """w_tj such that the loss is sum_tj w_tj * l_tj: s_t / sum s (or s_t / N_tok).

    All zero when no turn is supervised (never 0 / 0). Computed once for a whole
    batch, the weights let the batch be forwarded in pieces with the same loss.
    """
    s_N = s_T[turn_N].float()
    total = s_N.sum()
    if total == 0:
        return torch.zeros_like(s_N)
    return s_N / (total if switches.normalization else float(s_N.numel()))


def multi_turn_loss(
    student_logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor,
    teacher_logprobs_N: torch.Tensor,
    teacher_top1_N: torch.Tensor,
    turn_N: torch.Tensor,
    labels: list[Label],
    switches: LossSwitches,
) -> LossOutput:
    """OPD or SAGE-OPD over one batch of turns (OPD: LossSwitches.opd())."""
    loss_N, advantage_N = token_loss(
        student_logprobs_N, old_logprobs_N, teacher_logprobs_N, switches.ppo_clip
    )
    s_T = turn_scores(teacher_top1_N, turn_N, labels, switches)
    w_N = token_weights(s_T, turn_N, switches).to(loss_N.dtype)
    n_tok = loss_N.numel()
    # A batch with no supervised turn keeps the graph with a zero loss.
    loss = (w_N * loss_N).sum()
    return LossOutput(
        loss=loss,
        skipped=bool(w_N.sum() == 0),
        advantage_mean=float(advantage_N.mean()) if n_tok else 0.0,
        turn_scores=s_T,
        mean_token_weight=float(w_N.sum()) if n_tok else 0.0,
    )


def topk_reverse_kl(
    student_logits_NV: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
) -> torch.Tensor:
    """Per token: reverse KL(pi_S || pi_T) over the teacher's top-k plus one tail bucket.

    The tail holds all probability outside the top-k, for each model. (Ours: the
    top-k variant of METHOD.md.)
    """
    student_logprobs_NV = torch.log_softmax(student_logits_NV.float(), dim=-1)
    student_k_NK = student_logprobs_NV.gather(1, teacher_topk_ids_NK)
    teacher_k_NK = teacher_topk_logprobs_NK.float()
    tail_s_N = torch.log1p(-student_k_NK.exp().sum(1).clamp(max=1 - 1e-6))
    tail_t_N = torch.log1p(-teacher_k_NK.exp().sum(1).clamp(max=1 - 1e-6))
    kl_N = (student_k_NK.exp() * (student_k_NK - teacher_k_NK)).sum(1)
    return kl_N + tail_s_N.exp() * (tail_s_N - tail_t_N)
