"""The losses of docs/method.md, symbol for symbol: standard multi-turn OPD and SAGE-OPD.

Shapes: every tensor is flat over the batch's trained tokens (suffix _N), with
``turn_N`` saying which turn each token belongs to; per-turn tensors have suffix _T,
distributions over the teacher's top-k (plus one tail bucket) _K.

    A_tj = sg( log pi_T(y) - log pi_S_old(y) )          teacher minus student (at sampling);
                                                         per chunk across tokenizers
                                                         (trainer/alignment.py)
    l_tj = - A_tj * log pi_S(y)                          sampled-token reverse KL (the paper's)
         = - min(r A, clip(r, 1-eps, 1+eps) A),  r = pi_S / pi_S_old   (PPO substeps)
    l_tj = D( pi_S(. | ctx), pi_T(. | ctx) )             or a full-distribution divergence:
                                                         reverse KL, forward KL, JSD(beta)
    L_OPD  = sum_tj l_tj / N_tok
    i_t    = 0 / alpha / 1 for Skip / Weak / Strong      turn-level intervention
    c_t    = sg( mean_j max_v pi_T(v | ctx) )            teacher confidence
    s_t    = i_t * c_t
    L_SAGE = sum_tj s_t l_tj / sum_tj s_t                loss normalization
           = sum_tj s_t l_tj / N_tok                     (ablation: no normalization)

Every loss is sum_tj w_tj l_tj with w_tj = s_t / sum s (or s_t / N_tok): token_weights
gives w for a whole batch, token_losses gives l for any slice of it, so a batch is
forwarded in pieces with exactly the loss multi_turn_loss computes in one go.
The PPO form has the same gradient as -A log pi_S at r = 1 (the first substep).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Label = Literal["Skip", "Weak", "Strong"]
# sampled: the paper's sampled-token reverse KL. reverse_kl / forward_kl / jsd: computed
# from the teacher's top-k log-probs plus a tail bucket. nll: -log pi_S(y), imitation of
# the sampled tokens (the off-policy SFT baseline, where another model sampled them).
Divergence = Literal["sampled", "reverse_kl", "forward_kl", "jsd", "nll"]
FULL_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass(frozen=True)
class LossSwitches:
    """Which parts of SAGE-OPD are on (all off is standard OPD), and the per-token loss."""

    intervention: bool = True  # i_t from the judge (off: i_t = 1)
    confidence: bool = True  # c_t from the teacher (off: c_t = 1)
    normalization: bool = True  # divide by sum s (off: by N_tok)
    alpha: float = 0.5  # i_t of a Weak turn
    ppo_clip: float = 0.2
    divergence: Divergence = "sampled"
    jsd_beta: float = 0.5  # JSD(beta): the mixture is beta pi_T + (1 - beta) pi_S

    @classmethod
    def opd(cls, divergence: Divergence = "sampled", **kwargs: float) -> LossSwitches:
        return cls(
            intervention=False,
            confidence=False,
            normalization=False,
            divergence=divergence,
            **kwargs,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class TokenTargets:
    """What the loss compares the student with, for each trained token (flat, _N).

    ``topk_ids_NK`` / ``topk_logprobs_NK``: the teacher's top-k ids and log-probs, needed
    by the full-distribution divergences only. ``advantage_N``: A_tj where it is not
    log pi_T(y) - log pi_S_old(y) token by token (a teacher with another tokenizer
    gives each token its chunk's advantage, trainer/alignment.py)."""

    old_logprobs_N: torch.Tensor  # log pi_S_old(y), at sampling
    teacher_logprobs_N: torch.Tensor  # log pi_T(y)
    topk_ids_NK: torch.Tensor | None = None
    topk_logprobs_NK: torch.Tensor | None = None
    advantage_N: torch.Tensor | None = None

    def advantage(self) -> torch.Tensor:
        """A_tj, without gradient."""
        if self.advantage_N is not None:
            return self.advantage_N.detach()
        return (self.teacher_logprobs_N - self.old_logprobs_N).detach()

    def slice(self, start: int, end: int) -> TokenTargets:
        """The targets of tokens [start, end)."""
        return self._map(lambda tensor: tensor[start:end])

    def to(self, device: torch.device | str) -> TokenTargets:
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenTargets:
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return TokenTargets(*(None if tensor is None else fn(tensor) for tensor in values))


def intervention(labels: list[Label], alpha: float) -> torch.Tensor:
    """i_t per turn: Skip 0, Weak alpha, Strong 1."""
    value = {"Skip": 0.0, "Weak": alpha, "Strong": 1.0}
    return torch.tensor([value[label] for label in labels], dtype=torch.float32)


def turn_confidence(teacher_top1_N: torch.Tensor, turn_N: torch.Tensor, turns: int) -> torch.Tensor:
    """c_t: the mean over each turn's tokens of the teacher's top-1 probability."""
    sums_T = torch.zeros(turns).index_add_(0, turn_N, teacher_top1_N.float())
    counts_T = torch.zeros(turns).index_add_(0, turn_N, torch.ones_like(teacher_top1_N).float())
    return sums_T / counts_T.clamp(min=1)


def turn_scores(
    confidence_T: torch.Tensor, labels: list[Label], switches: LossSwitches
) -> torch.Tensor:
    """s_t = i_t * c_t for every turn (1 where a part is switched off), given c_t."""
    turns = len(labels)
    i_T = intervention(labels, switches.alpha) if switches.intervention else torch.ones(turns)
    c_T = confidence_T.detach().float() if switches.confidence else torch.ones(turns)
    return i_T * c_T


def token_weights(
    s_T: torch.Tensor,
    turn_N: torch.Tensor,
    switches: LossSwitches,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """w_tj such that the loss is sum_tj w_tj * l_tj: s_t / sum s (or s_t / N_tok).

    All zero when no turn is supervised (never 0 / 0). Computed once for a whole
    batch, the weights let the batch be forwarded in pieces with the same loss.
    ``all_sum``: with the batch split over data-parallel ranks, sums a tensor over
    them, so that sum s and N_tok are the whole batch's (trainer/distributed.py).
    """
    s_N = s_T[turn_N].float()
    totals = torch.stack([s_N.sum(), torch.tensor(float(s_N.numel()))])
    total, n_tok = all_sum(totals) if all_sum is not None else totals
    if total == 0:
        return torch.zeros_like(s_N)
    return s_N / (total if switches.normalization else n_tok)


def sampled_token_loss(
    student_logprobs_N: torch.Tensor, targets: TokenTargets, ppo_clip: float
) -> torch.Tensor:
    """l_tj of the sampled-token reverse KL, in its PPO-clipped form."""
    advantage_N = targets.advantage()
    ratio_N = torch.exp(student_logprobs_N - targets.old_logprobs_N.detach())
    clipped_N = ratio_N.clamp(1 - ppo_clip, 1 + ppo_clip)
    return -torch.minimum(ratio_N * advantage_N, clipped_N * advantage_N)


def with_tail(logprobs_NK: torch.Tensor) -> torch.Tensor:
    """log-probs of the top-k, then one bucket holding the rest of the probability (_NK+1)."""
    rest_N = (1 - logprobs_NK.exp().sum(1)).clamp(min=1e-8)
    return torch.cat([logprobs_NK, rest_N.log()[:, None]], dim=1)


def kl(p_logprobs_NK: torch.Tensor, q_logprobs_NK: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probs over the same buckets."""
    return (p_logprobs_NK.exp() * (p_logprobs_NK - q_logprobs_NK)).sum(1)


def full_divergence(
    student_logprobs_NV: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    divergence: Divergence,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """D(pi_S, pi_T) per token over the teacher's top-k plus one tail bucket for each model.

    reverse_kl: KL(pi_S || pi_T), mode-seeking (the exact form of what the sampled-token
    loss estimates); forward_kl: KL(pi_T || pi_S), mass-covering, SFT on the teacher's
    distribution in the student's own states; jsd: GKD's generalized Jensen-Shannon,
    beta KL(pi_T || M) + (1 - beta) KL(pi_S || M) with M = beta pi_T + (1 - beta) pi_S.
    """
    student_NK = with_tail(student_logprobs_NV.gather(1, topk_ids_NK))
    teacher_NK = with_tail(teacher_topk_logprobs_NK.float())
    if divergence == "reverse_kl":
        return kl(student_NK, teacher_NK)
    if divergence == "forward_kl":
        return kl(teacher_NK, student_NK)
    if divergence == "jsd":
        if not 0 < jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
        mixture_NK = torch.logsumexp(
            torch.stack([teacher_NK + math.log(jsd_beta), student_NK + math.log(1 - jsd_beta)]),
            dim=0,
        )
        return jsd_beta * kl(teacher_NK, mixture_NK) + (1 - jsd_beta) * kl(student_NK, mixture_NK)
    raise ValueError(f"{divergence!r} is not a full-distribution divergence")


def token_losses(
    student_logprobs_N: torch.Tensor,
    targets: TokenTargets,
    switches: LossSwitches,
    student_logprobs_NV: torch.Tensor | None = None,
) -> torch.Tensor:
    """l_tj for every trained token under ``switches.divergence``.

    ``student_logprobs_NV`` (the student's log-probs over its whole vocabulary at each
    trained token) is needed by the full-distribution divergences only."""
    if switches.divergence == "sampled":
        return sampled_token_loss(student_logprobs_N, targets, switches.ppo_clip)
    if switches.divergence == "nll":
        return -student_logprobs_N
    if student_logprobs_NV is None or targets.topk_ids_NK is None:
        raise ValueError(f"divergence {switches.divergence} needs the full log-probs and top-k")
    assert targets.topk_logprobs_NK is not None
    return full_divergence(
        student_logprobs_NV,
        targets.topk_ids_NK.to(student_logprobs_NV.device),
        targets.topk_logprobs_NK.to(student_logprobs_NV.device),
        switches.divergence,
        switches.jsd_beta,
    )


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    skipped: bool  # every turn had s_t = 0: no supervision, zero loss
    kl_estimate: float  # mean of log pi_S_old(y) - log pi_T(y): the sampled reverse KL
    turn_scores: torch.Tensor  # s_t
    mean_token_weight: float  # average of the weights applied per token (1.0 for OPD)


def multi_turn_loss(
    student_logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor,
    teacher_logprobs_N: torch.Tensor,
    teacher_top1_N: torch.Tensor,
    turn_N: torch.Tensor,
    labels: list[Label],
    switches: LossSwitches,
    student_logprobs_NV: torch.Tensor | None = None,
    topk_ids_NK: torch.Tensor | None = None,
    topk_logprobs_NK: torch.Tensor | None = None,
) -> LossOutput:
    """OPD or SAGE-OPD over one batch of turns (OPD: LossSwitches.opd()): sum_tj w_tj l_tj."""
    targets = TokenTargets(old_logprobs_N, teacher_logprobs_N, topk_ids_NK, topk_logprobs_NK)
    s_T = turn_scores(turn_confidence(teacher_top1_N, turn_N, len(labels)), labels, switches)
    w_N = token_weights(s_T, turn_N, switches)
    l_N = token_losses(student_logprobs_N, targets, switches, student_logprobs_NV)
    n_tok = len(turn_N)
    # A batch with no supervised turn keeps the graph with a zero loss.
    return LossOutput(
        loss=(w_N.to(l_N.dtype) * l_N).sum(),
        skipped=bool(w_N.sum() == 0),
        kl_estimate=kl_estimate(old_logprobs_N, teacher_logprobs_N),
        turn_scores=s_T,
        mean_token_weight=float(w_N.sum()) if n_tok else 0.0,
    )


def kl_estimate(old_logprobs_N: torch.Tensor, teacher_logprobs_N: torch.Tensor) -> float:
    """The per-token reverse KL on the student's own samples: mean(log pi_S_old - log pi_T)."""
    if len(old_logprobs_N) == 0:
        return 0.0
    return float((old_logprobs_N - teacher_logprobs_N).mean())
