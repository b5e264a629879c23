"""Supervision across tokenizers, on real models through real services: the shipped tiny
student (a fitted 856-token vocabulary) taught by SmolLM2-135M (49,152 tokens)."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.env import EnvClient
from client.prompts import ChatRenderer, token_ends
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.http import running_server
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings
from trainer.alignment import chunks
from trainer.config import LossConfig, TrainConfig
from trainer.rollout import BatchedGenerator, EpisodeRecord, run_episodes
from trainer.sft import make_optimizer
from trainer.supervision import SupervisedEpisode, Supervisor
from trainer.train import Trainer
from trainer.update import build_batch, train_on_batch

MODELS = Path(__file__).resolve().parents[2] / "models" / "tiny"
STUDENT, TINY_TEACHER = MODELS / "student-init", MODELS / "teacher"


@pytest.fixture(scope="module")
def services(smollm2_dir: Path) -> Iterator[dict[str, str]]:
    """An env service (household, TextWorld Express twc), SmolLM2 and the tiny teacher."""
    with ExitStack() as stack:
        yield {
            "env": stack.enter_context(
                running_server(create_env_app(EnvSettings(environments="household,twx-twc")))
            ),
            "smollm2": stack.enter_context(
                running_server(
                    create_teacher_app(
                        TeacherSettings(model=str(smollm2_dir), model_name="smollm2")
                    )
                )
            ),
            "tiny": stack.enter_context(
                running_server(
                    create_teacher_app(TeacherSettings(model=str(TINY_TEACHER), model_name="tiny"))
                )
            ),
        }


def config_for(services: dict[str, str], out: Path, teacher: str = "smollm2", **changes):
    values = {
        "student": str(STUDENT),
        "teacher_urls": [services[teacher]],
        "env_url": services["env"],
        "history": None,
        "show_admissible": False,
        "max_turns": 3,
        "max_new_tokens": 24,
        "episodes_per_step": 4,
        "steps": 1,
        "eval_at_start": False,
        "eval_splits": [],
        "checkpoint_every": 0,
        "out_dir": str(out),
    }
    return TrainConfig(**(values | changes))


async def play(trainer: Trainer, split: str, task_ids: list[int]) -> list[EpisodeRecord]:
    """The trainer's student plays ``task_ids``, sampling (a fixed seed)."""
    async with EnvClient(trainer.config.env_url) as env:
        async with BatchedGenerator(
            trainer.model, trainer.tokenizer, trainer.config.max_new_tokens, seed=7
        ) as generator:
            return await run_episodes(
                env,
                generator,
                trainer.renderer,
                split,
                task_ids,
                trainer.agent,  # type: ignore[arg-type]
            )


async def supervise(
    trainer: Trainer, records: list[EpisodeRecord]
) -> tuple[list[SupervisedEpisode], Supervisor]:
    """Each episode supervised by the trainer's teachers, one at a time (so every teacher
    forward has the same shape in every run)."""
    async with AsyncExitStack() as stack:
        _, supervisor = await trainer.connect(stack)
        return [await supervisor.supervise(r) for r in copy.deepcopy(records)], supervisor


def kl_of(trainer: Trainer, episodes: list[SupervisedEpisode]) -> float:
    """The sampled reverse KL per student token, mean(log pi_S_old - log pi_T), chunk-level."""
    targets = build_batch(trainer.renderer, episodes, trainer.config).targets
    return float((targets.old_logprobs_N - targets.teacher_logprobs_N).mean())


@pytest.mark.parametrize(
    ("student_ends", "teacher_ends", "expected"),
    [
        # "Thought" | ":" against "Th" "ought" | ":", then both end-of-turn tokens
        ([7, 8, 8], [2, 7, 8, 8], [(0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 4)]),
        # a student token ending inside a character (None) joins the next one
        ([None, 3, 5], [3, 5], [(0, 2, 0, 1), (2, 3, 1, 2)]),
        # the teacher's text stops short: what is left joins the last chunk
        ([2, 4, 6], [2, 4], [(0, 1, 0, 1), (1, 3, 1, 2)]),
        # no common boundary but the end
        ([3, 6], [2, 4, 6], [(0, 2, 0, 3)]),
    ],
)
def test_chunks_are_the_smallest_runs_whose_boundaries_agree(
    student_ends: list, teacher_ends: list, expected: list
) -> None:
    mapped = chunks(student_ends, teacher_ends)
    assert [
        (c.student_start, c.student_end, c.teacher_start, c.teacher_end) for c in mapped
    ] == expected


async def test_chunks_cover_every_student_token_once(
    services: dict[str, str], smollm2_dir: Path, tmp_path: Path
) -> None:
    trainer = Trainer(config_for(services, tmp_path / "run"), progress=False)
    records = await play(trainer, "valid_seen", [0, 1])
    supervised, supervisor = await supervise(trainer, records)
    assert supervisor.current == {0: "chunks"}  # another vocabulary: chosen automatically
    teacher_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    teacher = ChatRenderer(teacher_tokenizer)
    # What the student sampled, and random ids of its vocabulary (bytes split anyhow).
    rng = random.Random(0)
    responses = [turn.response_ids for record in records for turn in record.turns]
    responses += [[rng.randrange(len(trainer.tokenizer)) for _ in range(12)] for _ in range(40)]
    offsets = [o for episode in supervised for o in episode.teacher_offsets or []]
    uneven = 0
    for index, ids in enumerate(responses):
        text = trainer.tokenizer.decode(ids, skip_special_tokens=True)
        closed = ids[-1] == trainer.tokenizer.eos_token_id or not text
        own, ends = teacher.text_response(text, closed)
        if index < len(offsets):
            assert offsets[index] == ends  # the service's offsets are the teacher's own
        mapped = chunks(token_ends(trainer.tokenizer, ids), ends)
        assert [i for c in mapped for i in range(c.student_start, c.student_end)] == list(
            range(len(ids))
        )
        assert [j for c in mapped for j in range(c.teacher_start, c.teacher_end)] == list(
            range(len(own))
        )
        # In what the student said, a chunk is the same text on both sides. (Random ids
        # may decode to control characters, which SmolLM2's tokenizer drops.)
        for c in mapped[:-1] if index < len(offsets) else []:
            student = trainer.tokenizer.decode(
                ids[c.student_start : c.student_end], skip_special_tokens=True
            )
            mine = teacher_tokenizer.decode(
                own[c.teacher_start : c.teacher_end], skip_special_tokens=True
            )
            assert student == mine
        uneven += any(
            c.student_end - c.student_start != c.teacher_end - c.teacher_start for c in mapped
        )
    assert uneven > 0  # the two tokenizers do cut the text differently


async def test_with_one_tokenizer_chunk_level_equals_token_level(
    services: dict[str, str], tmp_path: Path
) -> None:
    """The tiny teacher shares the student's vocabulary: forcing chunk-level gives the
    token-level batch and update, chunk by chunk of one token."""
    loss = LossConfig(kind="sage", substeps=2)
    tokens = Trainer(config_for(services, tmp_path / "a", "tiny", loss=loss), progress=False)
    chunked = Trainer(
        config_for(services, tmp_path / "b", "tiny", loss=loss, alignment="chunks"), progress=False
    )
    records = await play(tokens, "train", [3, 4, 5])
    for record in records:  # responses as the tokenizer writes their text (re-encoding gives them)
        for turn in record.turns:
            text = tokens.tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            closed = turn.response_ids[-1] == tokens.tokenizer.eos_token_id
            turn.response_ids = tokens.tokenizer.encode(text, add_special_tokens=False) + (
                [tokens.tokenizer.eos_token_id] if closed else []
            )
            turn.sampling_logprobs = [-0.1 * (i + 1) for i in range(len(turn.response_ids))]
    by_tokens, supervisor = await supervise(tokens, records)
    assert supervisor.current == {0: "tokens"}
    by_chunks, supervisor = await supervise(chunked, records)
    assert supervisor.current == {0: "chunks"}
    assert all(e.teacher_offsets is None for e in by_tokens)
    assert all(e.teacher_offsets is not None for e in by_chunks)
    a = build_batch(tokens.renderer, by_tokens, tokens.config)
    b = build_batch(chunked.renderer, by_chunks, chunked.config)
    assert len(a.turn_N) > 20 and a.labels == b.labels
    assert [c.spans for c in a.contexts] == [c.spans for c in b.contexts]
    for x, y in [
        (a.turn_N, b.turn_N),
        (a.confidence_T, b.confidence_T),
        (a.targets.old_logprobs_N, b.targets.old_logprobs_N),
        (a.targets.teacher_logprobs_N, b.targets.teacher_logprobs_N),
        (a.targets.advantage_N, b.targets.advantage_N),
    ]:
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    updated = []
    for trainer, batch in ((tokens, a), (chunked, b)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(STUDENT)
        optimizer = make_optimizer(model, 1e-3, 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        model.train()
        metrics = train_on_batch(
            model, optimizer, scheduler, batch, trainer.config, trainer.tokenizer.pad_token_id
        )
        updated.append((metrics, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (m1, p1), (m2, p2) = updated
    for key in ("loss", "kl_estimate", "mean_turn_score", "grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6)


async def test_a_short_sage_opd_run_lowers_the_chunk_level_kl(
    services: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A random student with a fitted tokenizer moves towards SmolLM2: the sampled KL per
    student token on held-out tasks falls. (The shipped student, already an agent, is
    pulled away from its task by a teacher that does not know the world: README.)"""
    config = config_for(
        services, tmp_path / "run", student=str(tiny_model_dir), steps=4, lr=1e-2, max_new_tokens=16
    )
    trainer = Trainer(config, progress=False)
    held_out = list(range(8))
    before, _ = await supervise(trainer, await play(trainer, "valid_unseen", held_out))
    rows = await trainer.run()
    after, _ = await supervise(trainer, await play(trainer, "valid_unseen", held_out))
    assert [row["teacher_alignments"] for row in rows] == [["chunks"]] * 4
    assert rows[-1]["kl_estimate"] < rows[0]["kl_estimate"]
    kl_before, kl_after = kl_of(trainer, before), kl_of(trainer, after)
    assert kl_after < kl_before - 0.3, (kl_before, kl_after)


async def test_one_student_learns_in_two_environments_from_a_teacher_each(
    services: dict[str, str], tmp_path: Path
) -> None:
    """Household episodes go to the tiny teacher (the student's vocabulary, token-level),
    TextWorld Express ones to SmolLM2 (another family, chunk-level)."""
    tiny, smollm2 = services["tiny"], services["smollm2"]
    config = config_for(
        services,
        tmp_path / "run",
        envs=["twx-twc"],
        teachers={"household": [tiny], "twx-*": [smollm2]},
        max_turns=2,
        eval_splits=["valid_seen"],
        eval_tasks=1,
    )
    row = (await Trainer(config, progress=False).run())[-1]
    supervised = sorted((t["env"], t["teacher"], t["alignment"]) for t in row["episode_teachers"])
    assert supervised == [("household", tiny, "tokens")] * 2 + [("twx-twc", smollm2, "chunks")] * 2
    assert row["teacher_alignments"] == ["chunks", "tokens"]
    assert row["tokens"] > 0 and row["loss"] == row["loss"]
    assert "eval_valid_seen_success" in row and "eval_twx-twc_valid_seen_success" in row
