"""Muon: torch.optim.Muon's update with the Newton-Schulz iteration in float32."""

from __future__ import annotations

import pytest
import torch

from trainer.muon import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_orthogonalize_makes_every_singular_value_about_one(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    # A matrix whose singular values span two orders of magnitude.
    u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
    g = u @ torch.diag(torch.logspace(-2, 0, min(shape))) @ v
    singular = torch.linalg.svdvals(orthogonalize(g))
    # The quintic iteration aims at the band around 1, not at 1 exactly.
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 50


def test_a_step_matches_torchs_muon_scaled_to_adamw() -> None:
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(48, 96))
    theirs = torch.nn.Parameter(ours.detach().clone())
    mine = Muon([ours], lr=0.01, weight_decay=0.1)
    reference = torch.optim.Muon(
        [theirs], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"
    )
    start = ours.detach().clone()
    for _ in range(3):
        grad = torch.randn(48, 96)
        ours.grad, theirs.grad = grad, grad.clone()
        mine.step()
        reference.step()
    # torch iterates in bfloat16, so the two moves agree to bfloat16's precision.
    torch.testing.assert_close(ours - start, theirs - start, rtol=0.05, atol=2e-3)
    assert (ours - start).abs().max() > 0.01  # it moved


def test_muon_refuses_a_vector() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.01)
