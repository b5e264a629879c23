"""Trainer step overhead: trained tokens/s of the trainer's step, over a bare forward + backward.

The same student (the ~5M-parameter random "teacher"-size Llama on the household
tokenizer) and the same batch: 16 household-like episodes of 10 turns with the
whole history, their response tokens trained. The trainer's side is
``trainer.update.train_on_batch`` (turn scores and token weights, forwards in
pieces, per-token gathers, PPO-clip loss, clipping, AdamW step), preceded by
``build_batch`` (rendering the contexts). The bare side is one transformers
forward of the same padded contexts, cross-entropy on the same tokens, backward. Both
alternate for a few rounds; the medians are compared. Prints, last, the ratio
trainer / bare of trained tokens per second (target >= 0.8).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _models import random_episode, tiny_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer
from client.protocol import ModelRef
from trainer.config import LossConfig, TrainConfig
from trainer.rollout import EpisodeRecord, TurnRecord
from trainer.sft import IGNORE, collate, make_optimizer
from trainer.supervision import SupervisedEpisode
from trainer.update import build_batch, train_on_batch


def episodes(tokenizer, count: int, turns: int) -> list[SupervisedEpisode]:
    """Episodes as the trainer receives them, with made-up sampling and teacher numbers."""
    rng = random.Random(0)
    out = []
    for e in range(count):
        task, wire = random_episode(tokenizer, turns, seed=e)
        record = EpisodeRecord("train", e, task, "pick_and_place")
        for turn in wire:
            n = len(turn.response_ids)
            record.turns.append(
                TurnRecord(
                    observation=turn.observation,
                    admissible_actions=turn.admissible_actions,
                    prompt_ids=[],
                    response_ids=turn.response_ids,
                    sampling_logprobs=[-rng.random() for _ in range(n)],
                    action="look",
                    feedback=turn.feedback,
                    admissible=True,
                )
            )
        out.append(
            SupervisedEpisode(
                record=record,
                labels=[rng.choice(["Skip", "Weak", "Strong"]) for _ in wire],
                forced=[False] * turns,
                teacher_logprobs=[[-rng.random() for _ in t.response_ids] for t in wire],
                teacher_top1=[[rng.random() for _ in t.response_ids] for t in wire],
                topk_ids=None,
                topk_logprobs=None,
                model=ModelRef(name="teacher", revision="bench"),
                tokens_forwarded=0,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = tiny_teacher(size="teacher")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    renderer = ChatRenderer(tokenizer)
    config = TrainConfig(student=str(path), loss=LossConfig(kind="sage"))
    supervised = episodes(tokenizer, args.episodes, args.turns)
    optimizer = make_optimizer(model, 1e-5, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    pad = tokenizer.pad_token_id

    def trainer_step() -> tuple[float, int]:
        start = time.perf_counter()
        batch = build_batch(renderer, supervised, config)
        train_on_batch(model, optimizer, scheduler, batch, config, pad)
        return time.perf_counter() - start, len(batch.turn_N)

    contexts = build_batch(renderer, supervised, config).contexts
    tensors = collate(contexts, pad)

    def bare_step() -> tuple[float, int]:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logits = model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).logits
        labels = tensors["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE
        )
        loss.backward()
        return time.perf_counter() - start, int((labels != IGNORE).sum())

    trainer_step(), bare_step()  # warm-up
    trainer_rates, bare_rates = [], []
    for round_ in range(args.rounds):
        seconds, tokens = trainer_step()
        trainer_rates.append(tokens / seconds)
        seconds, tokens = bare_step()
        bare_rates.append(tokens / seconds)
        print(f"round {round_}: trainer {trainer_rates[-1]:.0f} tok/s, bare {bare_rates[-1]:.0f}")
    padded = tensors["input_ids"].numel()
    print(f"batch: {len(contexts)} contexts, {padded} padded tokens")
    trainer_rate, bare_rate = statistics.median(trainer_rates), statistics.median(bare_rates)
    print(f"trainer step: {trainer_rate:.0f} trained tokens/s (median)")
    print(f"bare forward + backward: {bare_rate:.0f} trained tokens/s (median)")
    print(f"trainer / bare: {trainer_rate / bare_rate:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
