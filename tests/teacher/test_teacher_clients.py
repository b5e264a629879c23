"""The teacher clients: the OpenAI-compatible one, and the vocabulary fingerprint check."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from client.fingerprint import VocabularyMismatch, check_same_vocabulary, fingerprint_of
from client.prompts import ChatRenderer
from client.teacher import OpenAITeacherClient, TeacherClient
from services.teacher.app import create_app
from tests.teacher.test_teacher_service import max_diff, random_episode, teacher_settings
from trainer.models import fit_tokenizer


async def test_openai_compatible_client_scores_equal_the_native_fused_call(
    serve,
    tiny_model_dir: Path,
) -> None:
    url = serve(create_app(teacher_settings(tiny_model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task, turns = random_episode(tokenizer, 4, seed=3)
    async with (
        TeacherClient(url) as native,
        OpenAITeacherClient(url, model="tiny", renderer=ChatRenderer(tokenizer)) as compatible,
    ):
        fused = await native.score_episode(task, turns, judge=True, top_k=2)
        plain = await compatible.score_episode(task, turns, judge=True, top_k=2)
        # Responses as text: each client has the teacher's tokenizer cut them.
        texts = [
            turn.model_copy(
                update={
                    "response_ids": None,
                    "response_text": tokenizer.decode(turn.response_ids, skip_special_tokens=True),
                }
            )
            for turn in turns
        ]
        fused_text = await native.score_episode(task, texts, judge=False)
        plain_text = await compatible.score_episode(task, texts, judge=False)
        student_print = fingerprint_of(tokenizer)
        check_same_vocabulary(student_print, await native.fingerprint())
    for a, b in zip(fused.turns, plain.turns, strict=True):
        assert max_diff(a.scores.logprobs, b.scores.logprobs) <= 1e-5
        assert max_diff(a.scores.top1_probs, b.scores.top1_probs) <= 1e-5
        assert a.scores.topk_ids == b.scores.topk_ids
        for label in a.verdict.probs:
            assert a.verdict.probs[label] == pytest.approx(b.verdict.probs[label], abs=1e-5)
        assert a.verdict.label == b.verdict.label
    assert plain.model.name == "tiny"
    for a, b, ids in zip(fused.turns, plain_text.turns, fused_text.turns, strict=True):
        assert max_diff(a.scores.logprobs, b.scores.logprobs) <= 1e-5
        assert b.scores.offsets == ids.scores.offsets and b.scores.offsets is not None


def test_a_vocabulary_mismatch_names_both_fingerprints(tiny_model_dir: Path) -> None:
    teacher = fingerprint_of(AutoTokenizer.from_pretrained(tiny_model_dir))
    student = fingerprint_of(fit_tokenizer(["look", "go to cabinet 1"] * 10, vocab_size=300))
    with pytest.raises(VocabularyMismatch) as caught:
        check_same_vocabulary(student, teacher)
    assert student.vocab_hash in str(caught.value) and teacher.vocab_hash in str(caught.value)


def test_the_same_tokenizer_with_another_chat_template_is_accepted(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = fingerprint_of(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    student = fingerprint_of(tokenizer)
    assert student.chat_template_hash != teacher.chat_template_hash
    check_same_vocabulary(student, teacher)
