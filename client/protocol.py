"""The wire contract of SAGE-OPD: every request and answer of both services.

The env service, the teacher service and their clients all import this one
module, so a field means the same thing on both sides of the wire. Nobody
builds a request dict by hand. Paths live under ``/v1``; every error answer is
an :class:`ErrorBody`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

API_PREFIX = "/v1"


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is needed here, not true or false")
    return value


# Request fields take what their JSON Schema says: an integer (3, or 3.0) but not
# true / false, which pydantic would read as 1 / 0; a boolean only as true / false.
# An optional bounded one is Annotated[int, Field(ge=...), NOT_A_BOOL] | None: bounds
# given before the validator are what the JSON Schema shows as minimum / maximum.
NOT_A_BOOL = BeforeValidator(_not_a_bool)
Int = Annotated[int, NOT_A_BOOL]
Bool = StrictBool


# Limits shared by services (which enforce them) and clients (which respect them).
MAX_ACTION_CHARS = 1_000
MAX_RESPONSE_CHARS = 32_768
MAX_BATCH_STEPS = 1_024
MAX_SEQUENCE_TOKENS = 32_768
MAX_SEQUENCES_PER_REQUEST = 256
MAX_TOP_K = 20

CLIENT_ID_HEADER = "X-Client-Id"


class _Model(BaseModel):
    # Unknown fields are refused: a misspelt option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- errors


class ErrorBody(_Model):
    """Every non-2xx answer of both services."""

    code: str  # machine-readable, e.g. "session_not_found", "queue_full"
    message: str  # one sentence for a person
    detail: Any = None


# --------------------------------------------------------------------------- env service

Split = Literal["train", "valid_seen", "valid_unseen"]


class EnvironmentInfo(_Model):
    name: str
    splits: dict[str, int]  # split -> number of tasks; ids run 0..n-1


class EnvironmentList(_Model):
    environments: list[EnvironmentInfo]


class TaskInfo(_Model):
    env: str
    split: str
    task_id: int
    task_type: str
    goal: str
    max_turns: int
    extra: dict[str, str | int | float] = Field(default_factory=dict)


class CreateSessionRequest(_Model):
    env: str = Field("household", max_length=64)
    split: Split = "train"
    task_id: Int = Field(0, ge=0)
    seed: Int = Field(0, ge=0, le=2**31 - 1)
    max_turns: Annotated[int, Field(ge=1, le=1_000), NOT_A_BOOL] | None = Field(
        None, description="Overrides the task's own"
    )


class StepResult(_Model):
    """What the agent sees after a reset or an action."""

    session_id: str
    observation: str
    turn: int  # actions taken so far in this episode
    done: bool
    won: bool
    truncated: bool = False  # done because max_turns was reached
    score: float = 0.0
    admissible_actions: list[str]


class SessionInfo(_Model):
    session_id: str
    task: TaskInfo
    turn: int
    done: bool
    won: bool


class SessionCreated(_Model):
    session_id: str
    task: TaskInfo
    first: StepResult  # the reset observation


class CreateSessionsRequest(_Model):
    """Open many sessions in one call (a trainer starting a batch of episodes)."""

    sessions: list[CreateSessionRequest] = Field(..., min_length=1, max_length=MAX_BATCH_STEPS)


class CreatedItem(_Model):
    """One session's outcome in a batch: the session, or the error it alone got."""

    result: SessionCreated | None = None
    error: ErrorBody | None = None
    status: int = 201


class CreateSessionsResponse(_Model):
    results: list[CreatedItem]


class CloseSessionsRequest(_Model):
    session_ids: list[str] = Field(..., min_length=1, max_length=MAX_BATCH_STEPS)


class CloseSessionsResponse(_Model):
    closed: list[str]
    not_found: list[str]


def _each_once(session_ids: list[str]) -> None:
    if len(session_ids) != len(set(session_ids)):
        raise ValueError("each session may appear once per batch")


class StepRequest(_Model):
    action: str = Field(..., max_length=MAX_ACTION_CHARS)


class SessionAction(_Model):
    session_id: str = Field(..., max_length=64)
    action: str = Field(..., max_length=MAX_ACTION_CHARS)


class BatchStepRequest(_Model):
    steps: list[SessionAction] = Field(..., min_length=1, max_length=MAX_BATCH_STEPS)

    @model_validator(mode="after")
    def _one_action_per_session(self) -> BatchStepRequest:
        _each_once([s.session_id for s in self.steps])
        return self


class BatchStepItem(_Model):
    """One session's outcome in a batch: a result, or the error it alone got."""

    session_id: str
    result: StepResult | None = None
    error: ErrorBody | None = None
    status: int = 200  # the status the same step would have had on its own


class BatchStepResponse(_Model):
    results: list[BatchStepItem]


class AdmissibleActions(_Model):
    session_id: str
    admissible_actions: list[str]


class ExpertAction(_Model):
    session_id: str
    action: str | None  # None once the task is won
    steps_left: int | None = None  # the expert's remaining steps, where the env can tell


class BatchExpertRequest(_Model):
    """The expert's next action in many sessions in one call (data gathering's hot path)."""

    session_ids: list[str] = Field(
        ..., min_length=1, max_length=MAX_BATCH_STEPS, json_schema_extra={"uniqueItems": True}
    )
    steps_left: Bool = False  # also the expert's remaining steps (costlier; see ExpertAction)

    @model_validator(mode="after")
    def _each_session_once(self) -> BatchExpertRequest:
        _each_once(self.session_ids)
        return self


class BatchExpertItem(_Model):
    """One session's answer in a batch: the expert's action, or the error it alone got."""

    session_id: str
    result: ExpertAction | None = None
    error: ErrorBody | None = None
    status: int = 200


class BatchExpertResponse(_Model):
    results: list[BatchExpertItem]


# --------------------------------------------------------------------------- teacher service

Label = Literal["Skip", "Weak", "Strong"]
LABELS: tuple[Label, ...] = ("Skip", "Weak", "Strong")
# "ready": loaded and warm, not the active model (a swap makes it "serving").
ModelState = Literal["loading", "warming", "ready", "serving", "draining", "unloaded", "failed"]


class ModelRef(_Model):
    """Names the teacher that produced an answer, so a swap is visible downstream."""

    name: str
    revision: str


class TokenizerFingerprint(_Model):
    vocab_size: int
    vocab_hash: str
    chat_template_hash: str
    special_tokens_hash: str


class ModelInfo(_Model):
    name: str
    revision: str
    source: str
    backend: str
    state: ModelState
    active: bool
    fingerprint: TokenizerFingerprint | None = None
    device: str | None = None
    dtype: str | None = None
    error: str | None = None


class ModelList(_Model):
    models: list[ModelInfo]


class Span(_Model):
    """Half-open [start, end) token positions of a response within a sequence."""

    start: Int = Field(..., ge=1)  # position 0 has no prefix to be scored against
    end: Int

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end <= self.start:
            raise ValueError("span end must be greater than start")
        return self


class ScoredSequence(_Model):
    input_ids: list[Int] = Field(..., min_length=2, max_length=MAX_SEQUENCE_TOKENS)
    spans: list[Span] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _spans_inside(self) -> ScoredSequence:
        last = 0
        for span in self.spans:
            if span.start < last or span.end > len(self.input_ids):
                raise ValueError("spans must be sorted, disjoint and inside input_ids")
            last = span.end
        return self


class ScoreRequest(_Model):
    sequences: list[ScoredSequence] = Field(..., min_length=1, max_length=MAX_SEQUENCES_PER_REQUEST)
    top_k: Int = Field(0, ge=0, le=MAX_TOP_K)
    deadline_s: float | None = Field(None, gt=0, le=3_600)


class SpanScores(_Model):
    """Teacher numbers for each token of one span, in order."""

    logprobs: list[float]  # log pi_T(given token | prefix)
    top1_probs: list[float]  # max_v pi_T(v | prefix)
    # Per token, the top-k ids by probability (descending), then the given token's
    # own entry when it is not among them (as vLLM's logprobs do).
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    # A response sent as text: the character where each scored token ends in it (its
    # end-of-turn token ends at the text's end), for mapping onto the student's tokens.
    offsets: list[int] | None = None


class SequenceScores(_Model):
    spans: list[SpanScores]


class ScoreResponse(_Model):
    model: ModelRef
    sequences: list[SequenceScores]
    tokens_forwarded: int


class EpisodeTurn(_Model):
    """One turn as the student lived it: what it saw, what it said, what came back.

    What it said is either the token ids it sampled (``response_ids``: the teacher
    shares the student's vocabulary and scores those very ids) or their text
    (``response_text``: the teacher tokenizes it with its own tokenizer, scores its
    own tokens and answers with each one's end in the text; see SpanScores.offsets)."""

    observation: str
    admissible_actions: list[str] = Field(default_factory=list)
    response_ids: list[Int] | None = Field(None, min_length=1)
    response_text: str | None = Field(None, max_length=MAX_RESPONSE_CHARS)
    # A text response: the student closed its turn (its end-of-turn token), so the
    # teacher scores its own end-of-turn token after the text too.
    ends_turn: Bool = True
    feedback: str = ""

    @model_validator(mode="after")
    def _one_response(self) -> EpisodeTurn:
        if (self.response_ids is None) == (self.response_text is None):
            raise ValueError("a turn has either response_ids or response_text, not both")
        if self.response_text == "" and not self.ends_turn:
            raise ValueError("an empty response_text must end its turn: nothing would be scored")
        return self


class EpisodeSpec(_Model):
    """A conversation by its parts; the teacher renders it with its own chat template
    (client/prompts.py) and splices in the student's response ids unchanged."""

    task: str
    turns: list[EpisodeTurn] = Field(..., min_length=1, max_length=1_000)


class JudgeRequest(_Model):
    """Judge the last turn of each episode (its response, given its feedback)."""

    episodes: list[EpisodeSpec] = Field(..., min_length=1, max_length=MAX_SEQUENCES_PER_REQUEST)
    history: Annotated[int, Field(ge=0), NOT_A_BOOL] | None = Field(
        None, description="Turns of history shown; None: all"
    )
    deadline_s: float | None = Field(None, gt=0, le=3_600)


class TurnVerdict(_Model):
    label: Label
    probs: dict[Label, float]  # renormalised over the three label words


class JudgeResponse(_Model):
    model: ModelRef
    verdicts: list[TurnVerdict]
    tokens_forwarded: int


class EpisodeRequest(EpisodeSpec):
    """The fused call: score every response token and judge every turn of one episode."""

    judge: Bool = True
    top_k: Int = Field(0, ge=0, le=MAX_TOP_K)
    history: Annotated[int, Field(ge=0), NOT_A_BOOL] | None = Field(
        None, description="Turns of history shown; None: all"
    )
    deadline_s: float | None = Field(None, gt=0, le=3_600)


class TurnScores(_Model):
    scores: SpanScores
    verdict: TurnVerdict | None = None


class EpisodeResponse(_Model):
    model: ModelRef
    turns: list[TurnScores]
    tokens_forwarded: int


class LoadModelRequest(_Model):
    name: str = Field(..., min_length=1, max_length=128)
    source: str = Field(..., min_length=1, max_length=1_024)  # HF id or local path
    revision: str | None = Field(None, max_length=128)
    gguf_file: str | None = Field(None, max_length=1_024)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    backend: Literal["transformers", "vllm"] = "transformers"
    trust_remote_code: Bool = False
    activate: Bool = False  # True: swap to it once it is warm


class SwapRequest(_Model):
    name: str


# OpenAI-compatible /v1/completions: the subset that scoring clients use.


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    prompt: str | list[Int] | list[str] | list[list[Int]]
    max_tokens: Int = Field(16, ge=0, le=4_096)
    temperature: float = Field(1.0, ge=0)
    echo: Bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_K), NOT_A_BOOL] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_K), NOT_A_BOOL] | None = None
    # vLLM's extension: the next token is chosen among these ids only, and its
    # log-probs are renormalised over them (vLLM: logprobs_mode=processed_logprobs).
    allowed_token_ids: list[Int] | None = Field(None, min_length=1, max_length=MAX_TOP_K)


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's extension: per prompt position, token id -> {logprob, rank, decoded_token}
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionUsage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
