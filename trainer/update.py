"""The update: a step's supervised episodes as one batch of trained tokens, and the
optimizer steps that apply trainer/losses.py's loss to it.

The token weights are fixed for the whole batch first, so the batch is forwarded in
pieces of bounded size with exactly the loss of one forward; over data-parallel
ranks (trainer/distributed.py) the weights' denominator is the whole step's.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from client.prompts import ChatRenderer, action_start, token_ends
from client.protocol import Label
from trainer.alignment import Chunk, chunks, identity
from trainer.config import TrainConfig
from trainer.distributed import SINGLE, DataParallel
from trainer.losses import FULL_DIVERGENCES, TokenTargets, token_losses, token_weights, turn_scores
from trainer.sft import Example, batch_logits, collate
from trainer.supervision import SupervisedEpisode, switches_of, wants_top_k

MAX_FORWARD_TOKENS = 16_384  # padded tokens per student forward while training


@dataclass
class Batch:
    """The step's trained tokens, flat (suffix _N), and the contexts that hold them."""

    contexts: list[Example]  # each context's trained spans, in token order
    targets: TokenTargets
    confidence_T: torch.Tensor  # c_t: the teacher's mean top-1 probability on its own tokens
    turn_N: torch.Tensor
    labels: list[Label]


def turn_chunks(
    renderer: ChatRenderer, episode: SupervisedEpisode, t: int, tokens: str
) -> tuple[int, list[Chunk]]:
    """Turn ``t``'s trained chunks (trainer/alignment.py) and its first trained student
    token: with ``tokens`` "action", the chunks from the one holding the action line's
    first token on; token-level supervision has one chunk per token."""
    response = episode.record.turns[t].response_ids
    ends = None
    if episode.teacher_offsets is None:
        mapped = identity(len(response))
    else:
        ends = token_ends(renderer.tokenizer, response)
        mapped = chunks(ends, episode.teacher_offsets[t])
    if tokens == "action":
        k = action_start(renderer.tokenizer, response, ends)
        mapped = [c for c in mapped if c.student_end > k]
    return (mapped[0].student_start if mapped else len(response)), mapped


def build_batch(
    renderer: ChatRenderer, episodes: list[SupervisedEpisode], config: TrainConfig
) -> Batch:
    """Every episode's contexts and, per trained token, what the loss reads.

    Each trained student token carries its chunk's advantage, log pi_T(chunk) -
    log pi_S_old(chunk), and, as its teacher log-prob, log pi_T(chunk) shared evenly
    among the chunk's student tokens (so the mean of log pi_S_old - log pi_T over the
    tokens is the per-token KL estimate under either alignment); c_t is the mean
    top-1 probability over the teacher's own tokens of the turn's trained chunks.
    With ``loss.tokens: action`` a response's trained tokens start at its action line.
    The teacher's top-k (full divergences only, token-level only) is cut to the first
    ``loss.top_k`` entries of each token: the answer may append the sampled token's own."""
    contexts, old, teacher, advantage, confidence, turn_index = [], [], [], [], [], []
    labels: list[Label] = []
    top_k = wants_top_k(config.loss)
    topk_ids: list[list[int]] = []
    topk_logprobs: list[list[float]] = []
    for episode in episodes:
        record = episode.record
        offset = len(labels)
        labels.extend(episode.labels)
        confidence.extend([0.0] * len(episode.labels))
        for context in renderer.contexts(record.task, record.episode_turns(), config.history):
            spans = []
            for t, (start, end) in zip(context.turns, context.spans, strict=True):
                k, mapped = turn_chunks(renderer, episode, t, config.loss.tokens)
                spans.append((start + k, end))
                sampled = record.turns[t].sampling_logprobs
                scored, top1 = episode.teacher_logprobs[t], episode.teacher_top1[t]
                for c in mapped:
                    size = c.student_end - c.student_start
                    old_chunk = sampled[c.student_start : c.student_end]
                    teacher_chunk = sum(scored[c.teacher_start : c.teacher_end])
                    old.extend(old_chunk)
                    teacher.extend([teacher_chunk / size] * size)
                    advantage.extend([teacher_chunk - sum(old_chunk)] * size)
                own_top1 = [p for c in mapped for p in top1[c.teacher_start : c.teacher_end]]
                confidence[offset + t] = sum(own_top1) / max(1, len(own_top1))
                turn_index.extend([offset + t] * (end - start - k))
                if top_k:
                    assert episode.topk_ids is not None and episode.topk_logprobs is not None
                    topk_ids.extend(row[:top_k] for row in episode.topk_ids[t][k:])
                    topk_logprobs.extend(row[:top_k] for row in episode.topk_logprobs[t][k:])
            contexts.append(Example(context.input_ids, spans))
    return Batch(
        contexts=contexts,
        targets=TokenTargets(
            old_logprobs_N=torch.tensor(old, dtype=torch.float32),
            teacher_logprobs_N=torch.tensor(teacher, dtype=torch.float32),
            topk_ids_NK=torch.tensor(topk_ids, dtype=torch.long) if top_k else None,
            topk_logprobs_NK=torch.tensor(topk_logprobs, dtype=torch.float32) if top_k else None,
            advantage_N=torch.tensor(advantage, dtype=torch.float32),
        ),
        confidence_T=torch.tensor(confidence, dtype=torch.float32),
        turn_N=torch.tensor(turn_index, dtype=torch.long),
        labels=labels,
    )


def _pieces(batch: Batch) -> list[list[int]]:
    """Context indices in groups of at most MAX_FORWARD_TOKENS padded tokens."""
    pieces: list[list[int]] = [[]]
    width = 0
    for i, context in enumerate(batch.contexts):
        new_width = max(width, len(context.input_ids))
        if pieces[-1] and new_width * (len(pieces[-1]) + 1) > MAX_FORWARD_TOKENS:
            pieces.append([])
            new_width = len(context.input_ids)
        pieces[-1].append(i)
        width = new_width
    return pieces


def student_token_outputs(
    model: Any, contexts: list[Example], pad_id: int, temperature: float, full: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_S of each trained token, in the batch's flat token order (and, with ``full``,
    the log-probs over the whole vocabulary there), at the sampling ``temperature``:
    the policy that sampled the tokens is softmax(logits / T), so at T != 1 the update
    stays on-policy only if the student is differentiated in that form."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(contexts, pad_id).items()}
    logits_BLV = batch_logits(model, batch)
    rows, cols = [], []
    for b, context in enumerate(contexts):
        for start, end in context.spans:
            rows.extend([b] * (end - start))
            cols.extend(range(start - 1, end - 1))  # the logits that predict each token
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    logits_NV = logits_BLV[rows_t, cols_t].float()
    if temperature > 0:
        logits_NV = logits_NV / temperature
    targets_N = batch["input_ids"][rows_t, cols_t + 1]
    logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
    logprobs_N = logprobs_NV.gather(1, targets_N[:, None])[:, 0]
    return logprobs_N, (logprobs_NV if full else None)


def train_on_batch(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Batch,
    config: TrainConfig,
    pad_id: int,
    data: DataParallel = SINGLE,
) -> dict[str, float]:
    """``loss.substeps`` optimizer steps on the batch; returns the step's loss metrics.

    The loss is trainer/losses.py's multi_turn_loss, sum_tj w_tj l_tj: the weights come
    from the whole batch once, the token losses from each piece that is forwarded.
    Over data-parallel ranks (``data``; ``model`` then DistributedDataParallel) the
    batch is this rank's share: the weights' denominator and the metrics are summed
    over the ranks, and each rank's loss is scaled by their number, since DDP averages
    the gradients it sums: every rank steps with the gradient of the whole batch's loss."""
    switches = switches_of(config.loss)
    s_T = turn_scores(batch.confidence_T, batch.labels, switches)
    w_N = token_weights(s_T, batch.turn_N, switches, data.all_sum)
    targets = batch.targets
    old_N, teacher_N = targets.old_logprobs_N, targets.teacher_logprobs_N
    sums = data.all_sum(
        torch.tensor(
            [len(batch.turn_N), len(s_T), s_T.sum(), w_N.sum(), (old_N - teacher_N).sum()],
            dtype=torch.float64,
        )
    )
    tokens, turns, score_sum, weight_sum, gap_sum = sums.tolist()
    skipped = weight_sum == 0
    metrics: dict[str, float] = {
        "tokens": tokens,
        "skipped": float(skipped),
        "mean_turn_score": score_sum / turns if turns else 0.0,
        "mean_token_weight": weight_sum,
    }
    if switches.divergence != "nll":  # imitation has no teacher to compare with
        metrics["kl_estimate"] = gap_sum / tokens if tokens else 0.0
    if skipped:  # no turn is supervised: nothing to learn, never a NaN
        metrics.update(loss=0.0, grad_norm=0.0)
        return metrics
    # Where each context's tokens start in the flat tensors.
    trained = (sum(end - start for start, end in c.spans) for c in batch.contexts)
    bounds = list(itertools.accumulate(trained, initial=0))
    device = next(model.parameters()).device
    full = switches.divergence in FULL_DIVERGENCES
    pieces: list[list[int]] = _pieces(batch) if batch.contexts else [[]]
    for _ in range(config.loss.substeps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for index, piece in enumerate(pieces):
            # DDP sums gradients at the last backward of the step, not at each piece's.
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last else no_sync(model):
                if not piece:  # a rank with no trained token still joins the gradient sum
                    piece_loss = idle_loss(model, pad_id)
                else:
                    start, end = bounds[piece[0]], bounds[piece[-1] + 1]
                    logprobs_N, logprobs_NV = student_token_outputs(
                        model, [batch.contexts[i] for i in piece], pad_id, config.temperature, full
                    )
                    piece_targets = targets.slice(start, end).to(device)
                    l_N = token_losses(logprobs_N, piece_targets, switches, logprobs_NV)
                    piece_loss = (w_N[start:end].to(device) * l_N).sum()
                (piece_loss * data.world).backward()
            total += piece_loss.detach().double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    scheduler.step()
    metrics.update(loss=float(data.all_sum(total)), grad_norm=float(grad_norm))
    return metrics


def no_sync(model: Any) -> contextlib.AbstractContextManager:
    """DDP's gradient sum held back (a model alone has nothing to hold back)."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def idle_loss(model: Any, pad_id: int) -> torch.Tensor:
    """A zero loss through every parameter, for a rank whose share has nothing to train:
    its backward adds nothing, but DDP's gradient sum needs every rank to take part."""
    device = next(model.parameters()).device
    logits = batch_logits(model, {"input_ids": torch.tensor([[pad_id]], device=device)})
    return logits.sum() * 0.0
