"""Supervision across tokenizers: the student's tokens and a teacher's, mapped by characters.

A teacher with the student's vocabulary scores the student's own token ids
(token-level supervision). A teacher of another family cannot: it is sent each
response as text, tokenizes it itself, and answers with its own tokens'
log-probs and where each ends in the text (client/prompts.py text_response).
The two tokenizations are then cut into the smallest chunks whose boundaries
agree in both: a chunk is a run of student tokens and a run of teacher tokens
that cover the same characters. A chunk's log-prob under each model is the sum
of its tokens' log-probs, and the sampled-token advantage becomes per chunk,
log pi_T(chunk) - log pi_S_old(chunk), applied to each of the chunk's student
tokens (docs/method.md, "Teachers of another family").

Token-level supervision is the special case where every chunk is one token on each
side (:func:`identity`), so the update has one code path for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# tokens: the teacher scores the student's ids; chunks: it scores its own tokens of the text.
Alignment = Literal["tokens", "chunks"]


@dataclass(frozen=True)
class Chunk:
    """Student tokens [student_start, student_end) and teacher tokens [teacher_start,
    teacher_end) of one response that cover the same characters."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int


def identity(n: int) -> list[Chunk]:
    """Token-level: the teacher scored the student's own n tokens, one chunk each."""
    return [Chunk(i, i + 1, i, i + 1) for i in range(n)]


def chunks(student_ends: Sequence[int | None], teacher_ends: Sequence[int]) -> list[Chunk]:
    """The smallest chunks whose boundaries agree in both tokenizations.

    ``student_ends[i]``: the character where student token i ends in the response text
    (None: inside a character, no boundary after it; see client/prompts.py
    token_ends); ``teacher_ends``: the same for the teacher's tokens (the service's
    SpanScores.offsets). A boundary is a character position where a token of each
    side ends; tokens after the last common boundary join the last chunk. Every
    student token is in exactly one chunk, and so is every teacher token. Empty
    tokens (end-of-turn) end where the text does and pair up in a chunk of their own.
    """
    out: list[Chunk] = []
    s0 = t0 = 0  # the open chunk's first tokens
    i = j = 0  # the next token of each side
    n, m = len(student_ends), len(teacher_ends)
    while i < n and j < m:
        s_end, t_end = student_ends[i], teacher_ends[j]
        if s_end is not None and s_end == t_end:
            out.append(Chunk(s0, i + 1, t0, j + 1))
            i, j = i + 1, j + 1
            s0, t0 = i, j
        elif s_end is None or s_end < t_end:
            i += 1
        else:
            j += 1
    if s0 < n or t0 < m:  # what no common boundary closed
        if out and (s0 == n or t0 == m):  # one side is spent: the rest joins the last chunk
            last = out.pop()
            s0, t0 = last.student_start, last.teacher_start
        out.append(Chunk(s0, n, t0, m))
    return out
