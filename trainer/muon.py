"""Muon: momentum made orthogonal, for the weight matrices of a transformer's hidden layers.

Muon (Jordan et al., 2024) replaces each matrix's (Nesterov) momentum by the
nearest semi-orthogonal matrix, found by a few Newton-Schulz iterations, so that
every direction of the update moves at the same rate instead of the few largest
ones. The update is scaled to AdamW's size (0.2 * sqrt(max(rows, cols)), Liu et
al., 2025, "Muon is Scalable for LLM Training"), so it shares AdamW's learning
rate, weight decay and schedule; embeddings and norms stay with AdamW.

It is torch.optim.Muon's update (same coefficients and scaling) with the
iteration in float32: torch's runs it in bfloat16, which a CPU without bfloat16
matrix units computes several times slower than the rest of a training step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# The quintic iteration's coefficients (torch.optim.Muon's and Keller Jordan's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g_AB: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with ``g_AB``'s singular vectors."""
    a, b, c = NS_COEFFICIENTS
    x = g_AB.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; weight decay is decoupled, as in AdamW."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        super().__init__(params, defaults)
        self.ns_steps = ns_steps
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes weight matrices only (2-D parameters)")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buffer.lerp_(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(buffer, mu), self.ns_steps)  # Nesterov
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * max(p.shape) ** 0.5)
