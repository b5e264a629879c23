"""Several continuations of one sequence in one forward: branches behind a 4-D mask.

A branch is a run of tokens that continues the main sequence after its first
``visible`` tokens instead of what follows them there. Flattened after the main
sequence, each branch attends to that prefix and to its own earlier tokens only
(never to another branch), at the position ids it would have had on its own, so
its logits are those of ``main[:visible] + branch`` run alone. The teacher
scores every turn's judge question this way in one forward of the episode; SFT
(trainer/sft.py) trains judge labels and DAgger corrections the same way, so a
branch is trained exactly as it is later read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BranchLayout:
    input_ids: list[int]  # the main sequence, then every branch
    main_len: int
    branches: tuple[tuple[int, int, int], ...] = ()  # (sees main up to, start, end)

    @classmethod
    def build(cls, main_ids: list[int], branches: Iterable[tuple[int, list[int]]]) -> BranchLayout:
        """``main_ids`` followed by each (visible, ids) branch."""
        input_ids = list(main_ids)
        placed = []
        for visible, ids in branches:
            if not 0 <= visible <= len(main_ids):
                raise ValueError(f"a branch after {visible} tokens of {len(main_ids)}")
            placed.append((visible, len(input_ids), len(input_ids) + len(ids)))
            input_ids.extend(ids)
        return cls(input_ids, len(main_ids), tuple(placed))

    def last_positions(self) -> list[int]:
        """Where each branch's last token sits (its logits predict what follows the branch)."""
        return [end - 1 for _, _, end in self.branches]

    def additive_mask(self, length: int) -> torch.Tensor:
        """[length, length] mask: 0 where a query may attend, float32's minimum elsewhere."""
        allowed_LL = torch.zeros((length, length), dtype=torch.bool)
        n = self.main_len
        allowed_LL[:n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
        for visible, start, end in self.branches:
            allowed_LL[start:end, :visible] = True
            width = end - start
            allowed_LL[start:end, start:end] = torch.ones((width, width), dtype=torch.bool).tril()
        # Padding rows see themselves only, so no row is fully masked.
        pad = torch.arange(len(self.input_ids), length)
        allowed_LL[pad, pad] = True
        mask_LL = torch.zeros((length, length), dtype=torch.float32)
        return mask_LL.masked_fill(~allowed_LL, torch.finfo(torch.float32).min)

    def position_ids(self, length: int) -> torch.Tensor:
        positions_L = torch.zeros(length, dtype=torch.long)
        positions_L[: self.main_len] = torch.arange(self.main_len)
        for visible, start, end in self.branches:
            positions_L[start:end] = torch.arange(visible, visible + end - start)
        return positions_L
