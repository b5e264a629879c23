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
        """[length, length] float32 mask: 0 where a query may attend, its minimum elsewhere."""
        return self.write_additive_mask(torch.empty((length, length), dtype=torch.float32))

    def write_additive_mask(self, out_LL: torch.Tensor, rows: int = 256) -> torch.Tensor:
        """Write the additive mask into ``out_LL`` (any float dtype and device), in place.

        Each position attends to its own run causally (the main sequence from 0, a
        branch from its start) and a branch also to the main tokens it continues.
        Those two numbers per position are the whole mask; it is expanded ``rows``
        rows at a time, so nothing else of size [length, length] is ever made.
        """
        length = out_LL.shape[-1]
        first_L = torch.zeros(length, dtype=torch.long)  # where its causal run starts
        sees_L = torch.zeros(length, dtype=torch.long)  # main tokens it sees besides
        for visible, start, end in self.branches:
            first_L[start:end] = start
            sees_L[start:end] = visible
        # Padding rows see themselves only, so no row is fully masked.
        first_L[len(self.input_ids) :] = torch.arange(len(self.input_ids), length)
        first_L, sees_L = first_L.to(out_LL.device), sees_L.to(out_LL.device)
        keys_L = torch.arange(length, device=out_LL.device)
        lowest = torch.finfo(out_LL.dtype).min
        for r in range(0, length, rows):
            query_R1 = keys_L[r : r + rows, None]
            allowed_RL = (keys_L >= first_L[r : r + rows, None]) & (keys_L <= query_R1)
            allowed_RL |= keys_L < sees_L[r : r + rows, None]
            out_LL[r : r + rows].fill_(lowest).masked_fill_(allowed_RL, 0.0)
        return out_LL

    def position_ids(self, length: int) -> torch.Tensor:
        positions_L = torch.zeros(length, dtype=torch.long)
        positions_L[: self.main_len] = torch.arange(self.main_len)
        for visible, start, end in self.branches:
            positions_L[start:end] = torch.arange(visible, visible + end - start)
        return positions_L
