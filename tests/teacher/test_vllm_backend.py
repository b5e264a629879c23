"""The vLLM backend against a fake engine that answers in vLLM's documented shapes.

The fake computes its numbers with a plain full forward of a real tiny Llama
(``torch.log_softmax`` of the logits), so the backend's parsing of vLLM's answers
is checked value for value against a direct transformers forward and against
the transformers backend on the same saved model. Its answers follow vLLM's
offline API: ``RequestOutput.prompt_logprobs`` is None at position 0, then per
position {token id: Logprob(logprob, rank, decoded_token)} holding the top-k and
always the given token (listed first, as vLLM builds it); ``outputs[0].logprobs``
holds one such dict per generated token. Generated-token log-probs are
"processed" ones (after masking to ``allowed_token_ids``), as the backend
configures its engine. The last tests run a real ``vllm.LLM`` where vLLM and a
GPU exist.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from client.prompts import ChatRenderer, agent_response
from client.protocol import EpisodeTurn
from services.teacher.backends.base import EpisodeItem, JudgeItem, ScoreItem
from services.teacher.backends.hf import TransformersBackend
from services.teacher.backends.vllm import RequestTypes, VLLMBackend
from trainer.config import LlamaShape
from trainer.models import build_llama, fit_tokenizer, save_model

TOLERANCE = 1e-5

# --------------------------------------------------------------------------- vLLM's shapes


@dataclass
class Logprob:
    """vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vllm.outputs.CompletionOutput (the fields the backend may read)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """vllm.outputs.RequestOutput (the fields the backend may read)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


def tokens_prompt(**kwargs: Any) -> dict[str, Any]:
    """vllm.inputs.TokensPrompt is a TypedDict: calling it builds a plain dict."""
    assert set(kwargs) <= {"prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}
    return dict(kwargs)


@dataclass
class SamplingParams:
    """vllm.SamplingParams' fields that matter here, with vLLM's defaults.

    A misspelt keyword fails as it would against vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    ignore_eos: bool = False


FAKE_TYPES = RequestTypes(tokens_prompt=tokens_prompt, sampling_params=SamplingParams)


def _entries(logprobs_V: torch.Tensor, k: int, given: int, tokenizer: Any) -> dict[int, Logprob]:
    """vLLM's dict for one position: the given token first, then the top-k (ranks 1..k)."""
    given_value = logprobs_V[given].item()
    given_rank = int((logprobs_V >= logprobs_V[given]).sum().item())
    entries = {given: Logprob(given_value, given_rank, tokenizer.decode([given]))}
    if k > 0:
        values, ids = logprobs_V.topk(k)
        for rank, (token, value) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), 1):
            entries[token] = Logprob(value, rank, tokenizer.decode([token]))
    return entries


@dataclass
class FakeLLM:
    """vllm.LLM's offline API over a real model: plain full forwards, no cache."""

    model: Any
    tokenizer: Any
    calls: list[tuple[list[Any], Any]] = field(default_factory=list)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        logits_LV = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits_LV.float(), dim=-1)

    def generate(
        self, prompts: list[Any], sampling_params: Any, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        self.calls.append((prompts, sampling_params))
        return [
            self._answer(i, p["prompt_token_ids"], sampling_params) for i, p in enumerate(prompts)
        ]

    def _answer(self, index: int, ids: list[int], params: SamplingParams) -> RequestOutput:
        assert params.temperature == 0, "the backend only asks for greedy answers"
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            logprobs_LV = self._logprobs(ids)
            prompt_logprobs = [None] + [
                _entries(logprobs_LV[p - 1], params.prompt_logprobs, ids[p], self.tokenizer)
                for p in range(1, len(ids))
            ]
        sequence, new_ids, steps = list(ids), [], []
        for _ in range(params.max_tokens):
            logits_V = self._logprobs(sequence)[-1]
            if params.allowed_token_ids is not None:
                masked_V = torch.full_like(logits_V, -math.inf)
                masked_V[params.allowed_token_ids] = logits_V[params.allowed_token_ids]
                logits_V = masked_V
            processed_V = torch.log_softmax(logits_V, dim=-1)  # processed_logprobs
            token = int(processed_V.argmax())
            if params.logprobs is not None:
                steps.append(_entries(processed_V, params.logprobs, token, self.tokenizer))
            new_ids.append(token)
            sequence.append(token)
            if token == self.tokenizer.eos_token_id and not params.ignore_eos:
                break
        completion = CompletionOutput(
            index=0,
            text=self.tokenizer.decode(new_ids),
            token_ids=new_ids,
            cumulative_logprob=None,
            logprobs=steps if params.logprobs is not None else None,
        )
        return RequestOutput(str(index), None, list(ids), prompt_logprobs, [completion])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose tokenizer makes the three judge labels single tokens."""
    corpus = [f"Verdict: {label}" for label in ("Skip", "Weak", "Strong") for _ in range(30)]
    tokenizer = fit_tokenizer(corpus, vocab_size=1000)
    model = build_llama(tokenizer, LlamaShape(), seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def hf(saved_model: Path) -> TransformersBackend:
    return TransformersBackend(str(saved_model), dtype="float32", device="cpu")


@pytest.fixture
def engine(hf: TransformersBackend) -> FakeLLM:
    return FakeLLM(hf.model, hf.tokenizer)


@pytest.fixture
def backend(saved_model: Path, engine: FakeLLM) -> VLLMBackend:
    return VLLMBackend(str(saved_model), dtype="float32", engine=engine, request_types=FAKE_TYPES)


@pytest.fixture(scope="module")
def renderer(hf: TransformersBackend) -> ChatRenderer:
    return ChatRenderer(hf.tokenizer)


@pytest.fixture(scope="module")
def label_ids(renderer: ChatRenderer) -> list[int]:
    return list(renderer.label_ids().values())


@pytest.fixture(scope="module")
def turns(renderer: ChatRenderer) -> list[EpisodeTurn]:
    def response(action: str) -> list[int]:
        text = agent_response(action, thought="look around")
        return renderer.tokenizer.encode(text, add_special_tokens=False) + [renderer.eos_id]

    return [
        EpisodeTurn(
            observation="You are in a kitchen.",
            admissible_actions=["go to fridge", "look"],
            response_ids=response("go to fridge"),
            feedback="You reach the fridge.",
        ),
        EpisodeTurn(
            observation="The fridge is closed.",
            admissible_actions=["open fridge"],
            response_ids=response("open fridge"),
            feedback="You open the fridge.",
        ),
        EpisodeTurn(
            observation="You see an apple.",
            admissible_actions=["take apple"],
            response_ids=response("take apple"),
            feedback="Nothing happens.",
        ),
    ]


SEQUENCES = [
    [5, 17, 42, 99, 7, 3, 250, 11],
    [1, 64, 64, 64, 200, 12],
]
ITEMS = [ScoreItem(SEQUENCES[0], [(1, 3), (4, 8)]), ScoreItem(SEQUENCES[1], [(2, 6)])]


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


# --------------------------------------------------------------------------- scoring


def test_score_equals_a_direct_forward(backend: VLLMBackend, hf: TransformersBackend) -> None:
    [spans_a, spans_b] = backend.score(ITEMS, top_k=0)
    for item, spans in ((ITEMS[0], spans_a), (ITEMS[1], spans_b)):
        with torch.inference_mode():
            logits_LV = hf.model(input_ids=torch.tensor([item.input_ids])).logits[0]
        logprobs_LV = torch.log_softmax(logits_LV.float(), dim=-1)
        for (start, end), scores in zip(item.spans, spans, strict=True):
            positions = range(start, end)
            expected = [logprobs_LV[p - 1, item.input_ids[p]].item() for p in positions]
            expected_top1 = [logprobs_LV[p - 1].max().exp().item() for p in positions]
            assert _max_diff(scores.logprobs, expected) <= TOLERANCE
            assert _max_diff(scores.top1_probs, expected_top1) <= TOLERANCE
            assert scores.topk_ids is None and scores.topk_logprobs is None


def test_score_with_top_k_agrees_with_the_transformers_backend(
    backend: VLLMBackend, hf: TransformersBackend
) -> None:
    ours, theirs = backend.score(ITEMS, top_k=4), hf.score(ITEMS, top_k=4)
    for spans, expected_spans in zip(ours, theirs, strict=True):
        for scores, expected in zip(spans, expected_spans, strict=True):
            assert _max_diff(scores.logprobs, expected.logprobs) <= TOLERANCE
            assert _max_diff(scores.top1_probs, expected.top1_probs) <= TOLERANCE
            assert scores.topk_ids == expected.topk_ids
            for values, expected_values in zip(
                scores.topk_logprobs, expected.topk_logprobs, strict=True
            ):
                assert _max_diff(values, expected_values) <= TOLERANCE


def test_a_given_token_outside_the_top_k_is_scored_and_appended(
    backend: VLLMBackend, hf: TransformersBackend
) -> None:
    # Position 0 holds vLLM's None: a span from 1 covers every scorable token,
    # and with k=1 most given tokens of a random model are outside the top-k.
    item = ScoreItem(SEQUENCES[0], [(1, len(SEQUENCES[0]))])
    [[scores]] = backend.score([item], top_k=1)
    [[expected]] = hf.score([item], top_k=1)
    outside = [j for j, ids in enumerate(scores.topk_ids) if len(ids) == 2]
    assert outside, "the sequence should hold a token outside the top-1"
    for j in outside:
        assert scores.topk_ids[j][1] == item.input_ids[1 + j]
        assert abs(scores.topk_logprobs[j][1] - scores.logprobs[j]) <= TOLERANCE
    assert scores.topk_ids == expected.topk_ids
    assert _max_diff(scores.logprobs, expected.logprobs) <= TOLERANCE


def test_a_span_at_position_zero_is_refused(backend: VLLMBackend) -> None:
    with pytest.raises(ValueError, match="position 0"):
        backend.score([ScoreItem(SEQUENCES[0], [(0, 2)])], top_k=0)


def test_score_requests_prompt_logprobs_for_exactly_the_given_ids(
    backend: VLLMBackend, engine: FakeLLM
) -> None:
    backend.score(ITEMS, top_k=0)
    backend.score(ITEMS, top_k=5)
    for (prompts, params), k in zip(engine.calls, (1, 5), strict=True):
        assert prompts == [{"prompt_token_ids": ids} for ids in SEQUENCES]
        assert params.prompt_logprobs == k
        assert params.max_tokens == 1
        assert params.temperature == 0


# --------------------------------------------------------------------------- judging


def test_judge_requests_carry_no_prompt_logprobs_and_only_the_labels(
    backend: VLLMBackend, engine: FakeLLM, label_ids: list[int]
) -> None:
    backend.label_probs([JudgeItem(ids) for ids in SEQUENCES], label_ids)
    [(prompts, params)] = engine.calls
    assert prompts == [{"prompt_token_ids": ids} for ids in SEQUENCES]
    assert params.prompt_logprobs is None
    assert params.max_tokens == 1
    assert params.temperature == 0
    assert params.allowed_token_ids == label_ids
    assert params.logprobs == len(label_ids)


def test_label_probs_equal_the_transformers_backend_and_sum_to_one(
    backend: VLLMBackend, hf: TransformersBackend, label_ids: list[int]
) -> None:
    items = [JudgeItem(ids) for ids in SEQUENCES]
    ours, theirs = backend.label_probs(items, label_ids), hf.label_probs(items, label_ids)
    for probs, expected in zip(ours, theirs, strict=True):
        assert _max_diff(probs, expected) <= TOLERANCE
        assert abs(sum(probs) - 1) <= TOLERANCE


class _AnswersWith:
    """An engine whose judge answer holds the given label entries only."""

    def __init__(self, tokenizer: Any, entries: dict[int, Logprob]) -> None:
        self.tokenizer, self.entries = tokenizer, entries

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: list[Any], params: Any, use_tqdm: bool = True) -> list[Any]:
        [token] = list(self.entries)[:1]
        completion = CompletionOutput(0, "", [token], None, [dict(self.entries)])
        return [
            RequestOutput("0", None, p["prompt_token_ids"], None, [completion]) for p in prompts
        ]


def test_a_label_missing_from_the_answer_counts_as_probability_zero(
    hf: TransformersBackend, label_ids: list[int]
) -> None:
    skip, weak, strong = label_ids
    engine = _AnswersWith(hf.tokenizer, {skip: Logprob(math.log(0.3)), strong: Logprob(-2.0)})
    backend = VLLMBackend("fake", engine=engine, request_types=FAKE_TYPES)
    [probs] = backend.label_probs([JudgeItem(SEQUENCES[0])], label_ids)
    expected_skip = 0.3 / (0.3 + math.exp(-2.0))
    assert probs == pytest.approx([expected_skip, 0.0, 1 - expected_skip])


def test_an_answer_without_any_label_is_an_error(
    hf: TransformersBackend, label_ids: list[int]
) -> None:
    engine = _AnswersWith(hf.tokenizer, {7: Logprob(-0.1)})
    backend = VLLMBackend("fake", engine=engine, request_types=FAKE_TYPES)
    with pytest.raises(RuntimeError, match="none of the label ids"):
        backend.label_probs([JudgeItem(SEQUENCES[0])], label_ids)


# --------------------------------------------------------------------------- episodes


def test_score_episodes_equals_the_transformers_fused_forward(
    backend: VLLMBackend,
    hf: TransformersBackend,
    renderer: ChatRenderer,
    turns: list[EpisodeTurn],
    label_ids: list[int],
) -> None:
    rendered = renderer.episode("put an apple in the fridge", turns)
    suffixes = [renderer.judge_suffix(turns[: t + 1]) for t in range(len(turns))]
    items = [EpisodeItem(rendered.input_ids, rendered.spans, suffixes)]
    [ours] = backend.score_episodes(items, top_k=3, label_ids=label_ids)
    [theirs] = hf.score_episodes(items, top_k=3, label_ids=label_ids)
    for scores, expected in zip(ours.spans, theirs.spans, strict=True):
        assert _max_diff(scores.logprobs, expected.logprobs) <= TOLERANCE
        assert _max_diff(scores.top1_probs, expected.top1_probs) <= TOLERANCE
        assert scores.topk_ids == expected.topk_ids
    assert len(ours.label_probs) == len(turns)
    for probs, expected in zip(ours.label_probs, theirs.label_probs, strict=True):
        assert _max_diff(probs, expected) <= TOLERANCE


# --------------------------------------------------------------------------- the rest


def test_tokens_forwarded_grows_by_the_prompt_lengths(
    backend: VLLMBackend, label_ids: list[int]
) -> None:
    total = sum(len(ids) for ids in SEQUENCES)
    backend.score(ITEMS, top_k=2)
    assert backend.tokens_forwarded == total
    backend.label_probs([JudgeItem(ids) for ids in SEQUENCES], label_ids)
    assert backend.tokens_forwarded == 2 * total


def test_continue_greedy_equals_the_transformers_backend(
    backend: VLLMBackend, hf: TransformersBackend, engine: FakeLLM
) -> None:
    new_ids, logprobs = backend.continue_greedy(SEQUENCES[0], max_new_tokens=5)
    expected_ids, expected_logprobs = hf.continue_greedy(SEQUENCES[0], max_new_tokens=5)
    assert new_ids == expected_ids
    assert _max_diff(logprobs, expected_logprobs) <= TOLERANCE
    [(_, params)] = engine.calls
    assert (params.max_tokens, params.temperature, params.logprobs) == (5, 0, 0)


def test_backend_reports_what_the_service_reads(
    backend: VLLMBackend, hf: TransformersBackend
) -> None:
    assert backend.kind == "vllm"
    assert backend.device == "cuda"
    assert backend.dtype == "float32"
    assert backend.vocab_size == len(hf.tokenizer)
    assert backend.tokenizer is hf.tokenizer
    backend.close()
    assert backend.engine is None


# --------------------------------------------------------------------------- a real vLLM


@pytest.fixture(scope="module")
def real_vllm(saved_model: Path) -> Iterator[VLLMBackend]:
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    backend = VLLMBackend(
        str(saved_model),
        dtype="float32",  # the transformers reference runs in float32 too
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        max_model_len=1024,
    )
    yield backend
    backend.close()


def test_real_vllm_scores_like_the_transformers_backend(
    real_vllm: VLLMBackend, hf: TransformersBackend
) -> None:
    ours, theirs = real_vllm.score(ITEMS, top_k=3), hf.score(ITEMS, top_k=3)
    for spans, expected_spans in zip(ours, theirs, strict=True):
        for scores, expected in zip(spans, expected_spans, strict=True):
            assert _max_diff(scores.logprobs, expected.logprobs) <= 2e-3
            assert _max_diff(scores.top1_probs, expected.top1_probs) <= 2e-3


def test_real_vllm_judges_like_the_transformers_backend(
    real_vllm: VLLMBackend, hf: TransformersBackend, label_ids: list[int]
) -> None:
    # Checks that the engine's logprobs_mode returns every label's entry.
    items = [JudgeItem(ids) for ids in SEQUENCES]
    ours, theirs = real_vllm.label_probs(items, label_ids), hf.label_probs(items, label_ids)
    for probs, expected in zip(ours, theirs, strict=True):
        assert min(probs) > 0
        assert _max_diff(probs, expected) <= 2e-3
