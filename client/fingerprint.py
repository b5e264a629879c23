"""Tokenizer fingerprints: the same vocabulary on both sides, or a clear refusal.

The teacher scores the student's token ids, so both must share one vocabulary;
chat templates may differ (each side renders with its own). Duck-typed on a
Hugging Face tokenizer (get_vocab, chat_template, all_special_tokens).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from client.protocol import TokenizerFingerprint


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_of(tokenizer: Any) -> TokenizerFingerprint:
    vocab = tokenizer.get_vocab()
    special = {
        token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens
    }
    return TokenizerFingerprint(
        vocab_size=len(vocab),
        vocab_hash=_digest(sorted(vocab.items(), key=lambda item: item[1])),
        chat_template_hash=_digest(getattr(tokenizer, "chat_template", None) or ""),
        special_tokens_hash=_digest(special),
    )


class VocabularyMismatch(ValueError):
    pass


def check_same_vocabulary(student: TokenizerFingerprint, teacher: TokenizerFingerprint) -> None:
    """Raise VocabularyMismatch, naming both fingerprints, unless the vocabularies agree."""
    if student.vocab_hash != teacher.vocab_hash or student.vocab_size != teacher.vocab_size:
        raise VocabularyMismatch(
            "the student's and the teacher's vocabularies differ, so the teacher cannot score "
            f"the student's token ids: student vocab {student.vocab_hash} "
            f"({student.vocab_size} tokens), teacher vocab {teacher.vocab_hash} "
            f"({teacher.vocab_size} tokens)"
        )
