"""The request limits: checks that refuse a request (413, 422) before any work is queued.

Shared by the service (every queued request) and the routes (text, prompts).
"""

from __future__ import annotations

from collections.abc import Iterable

from services.http import ServiceError
from services.teacher.registry import LoadedModel


def check_ids(
    model: LoadedModel, sequences: Iterable[Iterable[int]], what: str = "Token ids"
) -> None:
    """422 naming the ids (the first few) that lie outside the model's vocabulary."""
    vocab = model.backend.vocab_size
    bad = sorted({t for ids in sequences for t in ids if not 0 <= t < vocab})
    if bad:
        raise ServiceError(
            422,
            "invalid_token_id",
            f"{what} must lie in [0, {vocab}) for {model.name}; these do not: {bad[:8]}.",
            {"vocab_size": vocab, "invalid_ids": bad[:8]},
        )


def check_size(tokens: int, limit: int, at_least: bool = False) -> None:
    """413 when a request renders to more tokens than the teacher takes in one request."""
    if tokens > limit:
        count = f"at least {tokens}" if at_least else str(tokens)
        raise ServiceError(
            413,
            "too_many_tokens",
            f"The request renders to {count} tokens; this teacher takes at most {limit} "
            "per request (SAGE_TEACHER_MAX_REQUEST_TOKENS).",
            {"tokens": tokens, "max_request_tokens": limit},
        )


def check_text(texts: Iterable[str]) -> None:
    """422 for text the tokenizer cannot take: not encodable as UTF-8 (a lone surrogate)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ServiceError(
                422,
                "invalid_request",
                f"Text must be encodable as UTF-8; {exc.object[exc.start]!r} at character "
                f"{exc.start} is not ({exc.reason}).",
            ) from exc
