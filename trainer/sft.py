"""Supervised fine-tuning on any causal LM: response-only loss, AdamW or Muon, warm-up + cosine.

Trains the CPU teacher (agent turns and judge examples), warm-starts the student,
and is the off-policy SFT baseline. An example is a token sequence with the spans
to learn; everything else (system prompt, observations, template tokens) is
context only. Examples come from the same rendering as rollouts (client/prompts.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from services.teacher.backends.branches import BranchLayout
from trainer.config import SFTConfig
from trainer.muon import Muon

IGNORE = -100  # the label torch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    """Token ids with the spans to learn, and branches: other continuations of its prefix.

    A branch (visible, start, end) is input_ids[start:end], a continuation of
    input_ids[:visible] in place of what follows there (services/teacher/backends/
    branches.py): it is trained exactly as if it were an example of its own, while
    the prefix they share is forwarded once. The main sequence is everything before
    the first branch.
    """

    input_ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) positions whose tokens are learned
    branches: tuple[tuple[int, int, int], ...] = ()
    # [start, end) positions that are neither learned nor language-modelled as context:
    # responses the agent should not have given (a noisy policy's slips), which the
    # context loss would otherwise teach as text to imitate.
    quiet: tuple[tuple[int, int], ...] = ()

    @classmethod
    def prompt_and_target(cls, prompt_ids: list[int], target_ids: list[int]) -> Example:
        return cls(prompt_ids + target_ids, [(len(prompt_ids), len(prompt_ids) + len(target_ids))])

    @classmethod
    def branched(
        cls,
        input_ids: list[int],
        spans: list[tuple[int, int]],
        branches: Sequence[tuple[int, list[int], int]],
        quiet: Sequence[tuple[int, int]] = (),
    ) -> Example:
        """``input_ids`` learning ``spans``, then for each (visible, ids, first_learned) a
        branch ``ids`` after input_ids[:visible] whose tokens from ``first_learned`` on are
        learned. A branch's first token is predicted by nothing in the flattened sequence,
        so first_learned is at least 1: a branch that should learn what follows
        input_ids[:visible] starts with input_ids[visible - 1] again, one step back."""
        if any(first < 1 for _, _, first in branches):
            raise ValueError("a branch's first token cannot be learned (start one step back)")
        layout = BranchLayout.build(input_ids, [(visible, ids) for visible, ids, _ in branches])
        learned = [
            (start + first, end)
            for (_, start, end), (_, _, first) in zip(layout.branches, branches, strict=True)
            if start + first < end
        ]
        return cls(layout.input_ids, [*spans, *learned], layout.branches, tuple(quiet))

    def layout(self) -> BranchLayout:
        main_len = min((start for _, start, _ in self.branches), default=len(self.input_ids))
        return BranchLayout(self.input_ids, main_len, self.branches)


def loss_mask(length: int, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """True at every position whose token is learned."""
    mask_L = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        mask_L[start:end] = True
    return mask_L


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, labels that are IGNORE outside the spans,
    and ``context``: the real tokens outside the spans that the token before them in the
    flattened sequence predicts (every one but the first of the main sequence and of each
    branch). With branches in the batch, also the 4-D mask and position ids they need."""
    width = max(len(e.input_ids) for e in batch)
    input_ids_BL = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_BL = torch.zeros((len(batch), width), dtype=torch.long)
    labels_BL = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    context_BL = torch.zeros((len(batch), width), dtype=torch.bool)
    for b, example in enumerate(batch):
        n = len(example.input_ids)
        ids_L = torch.tensor(example.input_ids, dtype=torch.long)
        learned_L = loss_mask(n, example.spans)
        input_ids_BL[b, :n] = ids_L
        attention_BL[b, :n] = 1
        labels_BL[b, :n] = torch.where(learned_L, ids_L, IGNORE)
        context_BL[b, 1:n] = ~learned_L[1:]
        for start, end in example.quiet:
            context_BL[b, start:end] = False
        for _, start, _ in example.branches:
            context_BL[b, start] = False
    out = {
        "input_ids": input_ids_BL,
        "attention_mask": attention_BL,
        "labels": labels_BL,
        "context": context_BL,
    }
    if any(example.branches for example in batch):
        layouts = [example.layout() for example in batch]
        out["branch_mask"] = torch.stack([layout.additive_mask(width) for layout in layouts])
        out["position_ids"] = torch.stack([layout.position_ids(width) for layout in layouts])
    return out


def batch_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a collated (right-padded) batch, shaped [B, L, V].

    Without branches no attention mask goes to the model: every pad comes after a
    row's real tokens, so under the causal mask no real position sees one, and the
    real positions' logits are those of the masked forward. Without a padding mask
    SDPA takes its causal kernel, which skips the future instead of computing and
    masking it. With branches the 4-D mask and position ids say who sees whom.
    """
    if "branch_mask" not in batch:
        return model(input_ids=batch["input_ids"], use_cache=False).logits
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["branch_mask"][:, None],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits


def token_batches(
    examples: Sequence[Example], batch_tokens: int, rng: random.Random
) -> list[list[Example]]:
    """Batches of similar length, each at most ``batch_tokens`` padded tokens, in random order.

    Examples with branches mix with those without: the loss is a mean over a batch's
    learned tokens, so a batch of judge sequences alone (a label or two per sequence)
    would weigh each label as much as a whole batch of agent turns.
    """
    order = sorted(examples, key=lambda e: len(e.input_ids) + rng.random())
    batches: list[list[Example]] = []
    current: list[Example] = []
    for example in order:
        width = len(example.input_ids)  # sorted: the newest is the widest
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(example)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def response_loss(
    model: Any, batch: dict[str, torch.Tensor], context_weight: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over the learned tokens of the batch.

    ``context_weight`` > 0 adds that times the mean cross-entropy of every other
    real token (system prompt, observations, template) but the quiet ones: language
    modelling of the environment's text, the pre-training a model built from scratch
    lacks.
    """
    logits_BLV = batch_logits(model, batch)
    # One log-softmax serves both terms: each real token's negative log-likelihood.
    nll_N = torch.nn.functional.cross_entropy(
        logits_BLV[:, :-1].flatten(0, 1).float(),
        batch["input_ids"][:, 1:].flatten(),
        reduction="none",
    )
    learned_N = batch["labels"][:, 1:].flatten() != IGNORE
    loss = nll_N[learned_N].mean()
    if context_weight > 0:
        context_N = batch["context"][:, 1:].flatten()
        if context_N.any():
            loss = loss + context_weight * nll_N[context_N].mean()
    return loss


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier: linear warm-up, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return _adamw([p for p in model.parameters() if p.requires_grad], lr, weight_decay)


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def sft_optimizers(model: Any, config: SFTConfig) -> list[torch.optim.Optimizer]:
    """AdamW (make_optimizer), or Muon on the hidden layers' matrices and AdamW on the rest.

    The rest is the embeddings, the output head and every vector (norms, biases):
    Muon is for the weights that map one hidden state to another (trainer/muon.py).
    """
    if config.optimizer == "adamw":
        return [make_optimizer(model, config.lr, config.weight_decay)]
    embeddings = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings().weight))
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim == 2 and id(p) not in embeddings]
    rest = [p for p in params if p.ndim != 2 or id(p) in embeddings]
    return [
        Muon(hidden, lr=config.lr, weight_decay=config.weight_decay),
        _adamw(rest, config.lr, config.weight_decay),
    ]


def sft(
    model: Any,
    examples: Sequence[Example],
    config: SFTConfig,
    pad_id: int,
    desc: str = "sft",
    progress: bool = True,
    on_step: Callable[[dict[str, float]], None] | None = None,
    max_steps: int | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on ``examples``; returns one metrics dict per optimizer step."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    epochs = max(1, math.ceil(config.epochs))
    plan = [b for _ in range(epochs) for b in token_batches(examples, config.batch_tokens, rng)]
    per_epoch = len(plan) // epochs
    plan = plan[: max(1, round(per_epoch * config.epochs))]
    if max_steps is not None:
        plan = plan[:max_steps]
    device = next(model.parameters()).device
    optimizers = sft_optimizers(model, config)
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, len(plan), config.warmup_steps, config.min_lr_ratio),
        )
        for optimizer in optimizers
    ]
    model.train()
    history: list[dict[str, float]] = []
    bar = tqdm(plan, desc=desc, disable=not progress, leave=False)
    for step, examples_in_batch in enumerate(bar):
        batch = {k: v.to(device) for k, v in collate(examples_in_batch, pad_id).items()}
        loss = response_loss(model, batch, config.context_weight)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for optimizer, schedule in zip(optimizers, schedules, strict=True):
            optimizer.step()
            schedule.step()
        metrics = {
            "step": step,
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": schedules[0].get_last_lr()[0],
            "tokens": int((batch["labels"] != IGNORE).sum()),
        }
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if on_step is not None:
            on_step(metrics)
    model.eval()
    return history
