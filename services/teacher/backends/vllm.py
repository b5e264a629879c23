"""The vLLM backend: a teacher on a GPU, served by vLLM's offline engine (``vllm.LLM``).

Scoring asks vLLM for prompt log-probs (``prompt_logprobs=k``, ``max_tokens=1``);
judging asks for one generated token restricted to the label ids and reads their
log-probs, so that automatic prefix caching serves every judge prompt after the
first from the episode's cached prefix (prompt_logprobs requests bypass that
cache). The engine is built here with prefix caching on; tests pass their own.

Only the engine's documented offline API is used: ``generate`` with
``TokensPrompt`` prompts and ``SamplingParams``, and ``get_tokenizer``. The two
vLLM request types come in through :class:`RequestTypes`, so this module imports
without vLLM and tests can check the requests it builds.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from client.protocol import MAX_TOP_K, SpanScores
from services.teacher.backends.base import JudgeItem, ScoreItem, TeacherBackend

log = logging.getLogger(__name__)

# vLLM's answer for one position: {token id: Logprob(logprob, rank, decoded_token)}.
PositionLogprobs = Mapping[int, Any]


@dataclass(frozen=True)
class RequestTypes:
    """How requests are built: vLLM's ``TokensPrompt`` and ``SamplingParams`` by default.

    Kept apart from the engine so the backend's request building can be tested
    without vLLM, by types that take the same keyword arguments.
    """

    tokens_prompt: Callable[..., Any]
    sampling_params: Callable[..., Any]

    @classmethod
    def from_vllm(cls) -> RequestTypes:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        return cls(tokens_prompt=TokensPrompt, sampling_params=SamplingParams)


class VLLMBackend(TeacherBackend):
    kind = "vllm"

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        engine: Any | None = None,
        *,
        request_types: RequestTypes | None = None,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__()
        self.source = source
        self.requests = request_types or RequestTypes.from_vllm()
        if engine is None:
            from vllm import LLM

            # Judging reads the label tokens' log-probs from a generated token
            # restricted to them (allowed_token_ids). vLLM's default
            # logprobs_mode, "raw_logprobs", computes those log-probs from the
            # logits *before* the allowed-token whitelist is applied, and returns
            # only the top-n of the whole vocabulary plus the sampled token: a
            # label outside the raw top-n would be missing. "processed_logprobs"
            # computes them after the whitelist, where every other token is -inf,
            # so the top-len(labels) entries are exactly the labels. See the
            # Sampler's documented order of steps (1: raw log-probs, 3: allowed
            # token ids) at https://docs.vllm.ai/en/v0.10.2/api/vllm/v1/sample/sampler.html
            # and the option at https://docs.vllm.ai/en/stable/configuration/engine_args/
            # (--logprobs-mode; vLLM >= 0.10). Prompt log-probs, used for scoring,
            # are computed from the raw logits in every mode, and with
            # temperature 0 no temperature is applied to the processed ones.
            engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            # vLLM caps logprobs/prompt_logprobs per request (default 20); the
            # wire contract allows top_k up to MAX_TOP_K.
            engine_kwargs.setdefault("max_logprobs", max(MAX_TOP_K, 20))
            engine = LLM(
                model=source,
                revision=revision,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                enable_prefix_caching=True,
                **engine_kwargs,
            )
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.device = "cuda"
        config = _model_config(engine)
        self.dtype = _dtype_name(getattr(config, "dtype", None)) or dtype
        vocab_size = len(self.tokenizer)
        if config is not None and hasattr(config, "get_vocab_size"):
            # The model's embedding may be padded past the tokenizer's vocabulary.
            vocab_size = max(vocab_size, int(config.get_vocab_size()))
        self.vocab_size = vocab_size
        self._warned_missing_labels = False

    # ------------------------------------------------------------------ requests

    def _generate(self, prompts: Sequence[list[int]], **sampling: Any) -> list[Any]:
        """One request per prompt, all with the same sampling parameters, in order."""
        requests = [self.requests.tokens_prompt(prompt_token_ids=list(ids)) for ids in prompts]
        params = self.requests.sampling_params(**sampling)
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM answered {len(outputs)} of {len(requests)} requests")
        return list(outputs)

    # ------------------------------------------------------------------ the interface

    def score(self, items: list[ScoreItem], top_k: int) -> list[list[SpanScores]]:
        if not items:
            return []
        outputs = self._generate(
            [item.input_ids for item in items],
            prompt_logprobs=max(top_k, 1),  # at least the top-1, for top1_probs
            max_tokens=1,  # vLLM generates at least one token; it is ignored
            temperature=0,
        )
        self.count_forwarded(sum(item.num_tokens for item in items))
        results = []
        for item, output in zip(items, outputs, strict=True):
            positions = output.prompt_logprobs
            if positions is None:
                raise RuntimeError("vLLM returned no prompt_logprobs for a scoring request")
            results.append(
                [
                    _span_scores(positions, item.input_ids, start, end, top_k)
                    for start, end in item.spans
                ]
            )
        return results

    def label_probs(self, items: list[JudgeItem], label_ids: list[int]) -> list[list[float]]:
        if not items:
            return []
        # No prompt_logprobs here: such requests skip vLLM's prefix cache, and
        # judge prompts share the episode prefix with the scoring request and
        # with each other.
        outputs = self._generate(
            [item.input_ids for item in items],
            max_tokens=1,
            temperature=0,
            logprobs=len(label_ids),
            allowed_token_ids=list(label_ids),
        )
        # What the engine was asked to process; with prefix caching it computes
        # only the tokens after the longest cached prefix, which is what keeps an
        # episode's judging linear in its turns.
        self.count_forwarded(sum(item.num_tokens for item in items))
        return [self._label_distribution(output, label_ids) for output in outputs]

    def continue_greedy(
        self, input_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], list[float]]:
        [output] = self._generate([input_ids], max_tokens=max_new_tokens, temperature=0, logprobs=0)
        completion = output.outputs[0]
        new_ids = list(completion.token_ids)
        steps = completion.logprobs or []
        # logprobs=0 still returns the sampled token's own entry at each step.
        logprobs = [step[token].logprob for step, token in zip(steps, new_ids, strict=True)]
        self.count_forwarded(len(input_ids) + len(new_ids))
        return new_ids, logprobs

    def close(self) -> None:
        engine, self.engine = self.engine, None
        del engine
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ parsing

    def _label_distribution(self, output: Any, label_ids: list[int]) -> list[float]:
        steps = output.outputs[0].logprobs
        if not steps:
            raise RuntimeError("vLLM returned no logprobs for a judge request")
        entries = steps[0]
        missing = [i for i in label_ids if i not in entries]
        if missing and not self._warned_missing_labels:
            # Only possible when the engine returns raw log-probs (logprobs_mode
            # other than "processed_logprobs"): the labels outside the raw top-n
            # then count as probability 0.
            self._warned_missing_labels = True
            log.warning(
                "vLLM's answer lacks label ids %s; is the engine's logprobs_mode "
                "'processed_logprobs'? They count as probability 0.",
                missing,
            )
        return _renormalised(entries, label_ids)


def _span_scores(
    positions: Sequence[PositionLogprobs | None],
    input_ids: list[int],
    start: int,
    end: int,
    top_k: int,
) -> SpanScores:
    """One span's numbers from vLLM's prompt_logprobs, in the transformers backend's convention.

    ``positions[p]`` holds the top-k entries at position p and always the entry of
    ``input_ids[p]``; vLLM gives None at position 0, which has no prefix.
    """
    logprobs, top1_probs = [], []
    topk_ids: list[list[int]] | None = [] if top_k > 0 else None
    topk_logprobs: list[list[float]] | None = [] if top_k > 0 else None
    for p in range(start, end):
        entries = positions[p]
        if entries is None:
            raise ValueError(f"no log-prob at position {p}: a scored span must start at 1 or later")
        given = input_ids[p]
        if given not in entries:
            raise RuntimeError(f"vLLM's prompt_logprobs at position {p} lack the given token")
        logprob = entries[given].logprob
        logprobs.append(logprob)
        # The rank-1 entry is always there (prompt_logprobs >= 1) and is the maximum.
        top1_probs.append(math.exp(max(e.logprob for e in entries.values())))
        if top_k > 0:
            # The dict holds k or k + 1 entries in no promised order: the k best by
            # log-prob (rank breaks ties, the given token's rank being > k when it
            # is outside them), then the given token when it is not among them.
            best = sorted(entries.items(), key=lambda kv: (-kv[1].logprob, _rank(kv[1])))
            ids = [token for token, _ in best[:top_k]]
            values = [entry.logprob for _, entry in best[:top_k]]
            if given not in ids:
                ids.append(given)
                values.append(logprob)
            topk_ids.append(ids)
            topk_logprobs.append(values)
    return SpanScores.model_construct(
        logprobs=logprobs,
        top1_probs=top1_probs,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )


def _rank(entry: Any) -> float:
    rank = getattr(entry, "rank", None)
    return math.inf if rank is None else rank


def _renormalised(entries: PositionLogprobs, label_ids: list[int]) -> list[float]:
    """Softmax over the labels' log-probs, in the order of ``label_ids``.

    The same numbers whether the engine's log-probs were taken before or after
    masking to the labels: renormalising over them cancels the normaliser.
    """
    values = [entries[i].logprob if i in entries else -math.inf for i in label_ids]
    top = max(values)
    if top == -math.inf:
        raise RuntimeError(
            f"vLLM's answer holds none of the label ids {label_ids}: cannot judge "
            "(the engine needs logprobs_mode='processed_logprobs')"
        )
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def _model_config(engine: Any) -> Any | None:
    """The engine's model config where it exposes one (``LLM.llm_engine.model_config``)."""
    config = getattr(engine, "model_config", None)
    if config is None:
        config = getattr(getattr(engine, "llm_engine", None), "model_config", None)
    return config


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
