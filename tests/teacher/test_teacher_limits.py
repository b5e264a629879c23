"""The teacher's limits: rendered tokens per request, request validation, admin loads, the
models list. Real uvicorn, real tiny models."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from client.protocol import ErrorBody, LoadModelRequest
from services.teacher.app import create_app
from services.teacher.registry import default_backend_factory
from services.teacher.settings import TeacherSettings
from tests.teacher.test_teacher_service import TOKEN, teacher_settings

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
DEFAULT_CAP = 16_384  # TeacherSettings.max_request_tokens


@pytest.fixture
def url(serve, tiny_model_dir: Path) -> str:
    return serve(create_app(teacher_settings(tiny_model_dir)))


def minimal_episode(turns: int, **options: object) -> dict:
    """An episode body of one-token responses: a few bytes per turn, ~73 rendered tokens."""
    return {"task": "t", "turns": [{"observation": "x", "response_ids": [5]}] * turns, **options}


def refused_for_size(answer: httpx.Response, limit: int) -> ErrorBody:
    assert answer.status_code == 413, answer.text[:300]
    error = ErrorBody.model_validate(answer.json())
    assert error.code == "too_many_tokens"
    assert str(limit) in error.message and error.detail["max_request_tokens"] == limit
    assert error.detail["tokens"] > limit and str(error.detail["tokens"]) in error.message
    return error


# --------------------------------------------------------------------------- 1. the token cap


async def test_an_episode_over_the_default_cap_is_refused(serve, tiny_model_dir: Path) -> None:
    # 280 turns render to ~20k tokens with their judge branches (a ~12 KB body).
    url = serve(create_app(teacher_settings(tiny_model_dir)))
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        answer = await http.post("/v1/episode", json=minimal_episode(280))
    refused_for_size(answer, DEFAULT_CAP)
    assert TeacherSettings().max_request_tokens == DEFAULT_CAP


async def test_a_windowed_episode_is_refused_before_it_is_rendered(
    serve,
    tiny_model_dir: Path,
) -> None:
    # A 40 KB body whose windows would render to ~10M tokens (about 25 s of rendering).
    url = serve(create_app(teacher_settings(tiny_model_dir)))
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        start = time.monotonic()
        answer = await http.post("/v1/episode", json=minimal_episode(1000, history=1000))
        elapsed = time.monotonic() - start
    refused_for_size(answer, DEFAULT_CAP)
    assert elapsed < 5


def over_cap_bodies(ids: list[int]) -> dict[str, dict]:
    """A body per route that renders to more than len(ids) tokens."""
    episode = {"task": "t", "turns": [{"observation": "x", "response_ids": ids}]}
    return {
        "/v1/score": {"sequences": [{"input_ids": ids, "spans": [{"start": 1, "end": len(ids)}]}]},
        "/v1/judge": {"episodes": [episode]},
        "/v1/episode": episode,
        "/v1/completions": {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0},
    }


@pytest.mark.parametrize("route", ["/v1/score", "/v1/judge", "/v1/episode", "/v1/completions"])
async def test_every_route_refuses_requests_over_the_cap(
    serve,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    monkeypatch.setenv("SAGE_TEACHER_MAX_REQUEST_TOKENS", "300")
    url = serve(create_app(teacher_settings(tiny_model_dir)))
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        over = await http.post(
            route, json=over_cap_bodies([5 + i % 600 for i in range(301)])[route]
        )
        under = await http.post(
            route, json=over_cap_bodies([5 + i % 600 for i in range(100)])[route]
        )
    refused_for_size(over, 300)
    assert under.status_code == 200, under.text[:300]


async def test_the_cap_counts_every_prompt_and_the_new_tokens_of_completions(
    serve,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGE_TEACHER_MAX_REQUEST_TOKENS", "300")
    url = serve(create_app(teacher_settings(tiny_model_dir)))
    prompt = list(range(5, 105))  # 100 tokens
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        three = await http.post("/v1/completions", json={"prompt": [prompt] * 3, "max_tokens": 1})
        long = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 201})
        fits = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    refused_for_size(three, 300)
    refused_for_size(long, 300)
    assert fits.status_code == 200, fits.text[:300]


PEAK_RSS = """
import json, sys
from client.prompts import ChatRenderer
from client.protocol import EpisodeRequest
from services.teacher.backends.base import EpisodeItem
from services.teacher.backends.hf import TransformersBackend

backend = TransformersBackend(sys.argv[1], device="cpu")
renderer = ChatRenderer(backend.tokenizer)
labels = list(renderer.label_ids().values())

def item(turns):
    body = {"task": "t", "turns": [{"observation": "x", "response_ids": [5]}] * turns}
    request = EpisodeRequest.model_validate(body)
    [c] = renderer.contexts(request.task, request.turns)
    suffixes = [renderer.judge_suffix(request.turns[: t + 1]) for t in c.turns]
    return EpisodeItem(c.input_ids, c.spans, suffixes)

def peak_rss():  # this process's own peak (ru_maxrss would count a large parent's)
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

backend.score_episodes([item(2)], 0, labels)
before = peak_rss()
long = item(int(sys.argv[2]))
backend.score_episodes([long], 0, labels)
print(json.dumps({"tokens": long.num_tokens, "growth_bytes": peak_rss() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_a_long_allowed_episode_costs_at_most_one_compact_mask(tiny_model_dir: Path) -> None:
    # ~14.6k tokens with their judge branches, under the default cap. The branch mask
    # is the only [L, L] tensor: it must be built once, in place, not as several
    # dense float and bool copies (before: ~9.5 bytes per mask element).
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_RSS), str(tiny_model_dir), "200"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["tokens"] <= DEFAULT_CAP
    per_element = measured["growth_bytes"] / measured["tokens"] ** 2
    print("peak RSS growth", measured, per_element)
    assert per_element <= 5.0, measured


# --------------------------------------------------------------------------- 2. completions


@pytest.mark.parametrize(
    "body, bad",
    [
        ({"prompt": [-1], "max_tokens": 0, "echo": True, "logprobs": 1}, -1),
        ({"prompt": [2**40], "max_tokens": 0, "echo": True, "logprobs": 1}, 2**40),
        ({"prompt": [5000], "max_tokens": 0, "echo": True, "logprobs": 1}, 5000),
        ({"prompt": [[5, 6], [7, 5001]], "max_tokens": 0, "prompt_logprobs": 1}, 5001),
        ({"prompt": [5, 6], "max_tokens": 1, "allowed_token_ids": [5, 9999]}, 9999),
    ],
)
async def test_completions_name_token_ids_outside_the_vocabulary(
    url: str, body: dict, bad: int
) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/v1/completions", json=body)
    assert answer.status_code == 422, answer.text[:300]
    error = ErrorBody.model_validate(answer.json())
    assert error.code == "invalid_token_id"
    assert "[0, 724)" in error.message and str(bad) in error.message


@pytest.mark.parametrize(
    "route, raw",
    [
        ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 1}'),
        ("/v1/completions", '{"prompt": ["fine", "a\\udfff"], "max_tokens": 0}'),
        (
            "/v1/episode",
            '{"task": "\\ud800", "turns": [{"observation": "x", "response_ids": [5]}]}',
        ),
        (
            "/v1/judge",
            '{"episodes": [{"task": "t", "turns": [{"observation": "x", "response_ids": [5], '
            '"feedback": "\\udc00"}]}]}',
        ),
    ],
)
async def test_text_that_is_not_utf8_is_refused(url: str, route: str, raw: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post(
            route, content=raw.encode(), headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 422, answer.text[:300]
    error = ErrorBody.model_validate(answer.json())
    assert error.code == "invalid_request" and "UTF-8" in error.message


async def test_a_long_completions_prompt_is_refused_up_front(url: str) -> None:
    # 20k ids: over the default cap (40k were accepted and took 38 s).
    body = {"prompt": [5 + i % 700 for i in range(20_000)], "max_tokens": 0, "echo": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        start = time.monotonic()
        answer = await http.post("/v1/completions", json={**body, "logprobs": 0})
        elapsed = time.monotonic() - start
    refused_for_size(answer, DEFAULT_CAP)
    assert elapsed < 5


# --------------------------------------------------------------------------- 3. admin loads


def gated_factory(gate: threading.Event, seen: list[str]):
    """The real backend factory; a load named "slow" waits for ``gate`` (holding the admin lock)."""

    def factory(request: LoadModelRequest):
        seen.append(request.source)
        if request.name == "slow":
            gate.wait(60)
        return default_backend_factory(request)

    return factory


async def test_a_symlink_repointed_during_another_load_cannot_leave_the_roots(
    serve,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
    tmp_path: Path,
) -> None:
    outside = shutil.copytree(tiny_model_dir_b, tmp_path / "outside")
    link = tiny_model_dir.parent / f"link-{uuid.uuid4().hex}"
    link.symlink_to(tiny_model_dir_b)  # inside the allowed roots when the load is asked
    gate, seen = threading.Event(), []
    app = create_app(teacher_settings(tiny_model_dir), gated_factory(gate, seen))
    url = serve(app)
    lock = app.state.service.models._admin
    try:
        async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=120) as http:
            slow = asyncio.create_task(
                http.post("/v1/models/load", json={"name": "slow", "source": str(tiny_model_dir_b)})
            )
            while len(seen) < 2:  # the slow load (after the start-up one) holds the admin lock
                await asyncio.sleep(0.01)
            linked = asyncio.create_task(
                http.post("/v1/models/load", json={"name": "linked", "source": str(link)})
            )
            while not lock._waiters:  # the linked load waits for the lock
                await asyncio.sleep(0.01)
            link.unlink()
            link.symlink_to(outside)
            gate.set()
            slow_answer, linked_answer = await slow, await linked
            names = [m["name"] for m in (await http.get("/v1/models")).json()["models"]]
    finally:
        gate.set()
        link.unlink(missing_ok=True)
    assert slow_answer.status_code == 200, slow_answer.text[:300]
    assert linked_answer.status_code == 403, linked_answer.text[:300]
    assert linked_answer.json()["code"] == "model_not_allowed"
    assert "linked" not in names
    assert not any(source.startswith(str(outside)) for source in seen)


async def test_a_load_reads_the_source_it_checked(
    serve,
    tiny_model_dir: Path,
    tiny_model_dir_b: Path,
) -> None:
    link = tiny_model_dir.parent / f"link-{uuid.uuid4().hex}"
    link.symlink_to(tiny_model_dir_b)
    gate, seen = threading.Event(), []
    gate.set()
    url = serve(create_app(teacher_settings(tiny_model_dir), gated_factory(gate, seen)))
    try:
        async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=120) as http:
            answer = await http.post("/v1/models/load", json={"name": "b", "source": str(link)})
    finally:
        link.unlink()
    assert answer.status_code == 200, answer.text[:300]
    real = str(tiny_model_dir_b.resolve())
    assert seen[-1] == real and answer.json()["source"] == real


@pytest.mark.parametrize("source", ["a" * 300, "{root}/" + "b" * 300, "{loop}", "{loop}/x"])
async def test_a_source_that_cannot_be_probed_is_a_client_error(
    url: str, tiny_model_dir: Path, source: str
) -> None:
    loop = tiny_model_dir.parent / f"loop-{uuid.uuid4().hex}"
    loop.symlink_to(loop)
    source = source.format(root=tiny_model_dir.parent, loop=loop)
    try:
        async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=60) as http:
            answer = await http.post("/v1/models/load", json={"name": "x", "source": source})
    finally:
        loop.unlink()
    assert answer.status_code in (404, 422), answer.text[:300]
    error = ErrorBody.model_validate(answer.json())
    assert error.code in ("model_not_found", "model_unusable") and error.message


# --------------------------------------------------------------------------- 4. the models list


async def test_a_loaded_inactive_model_is_ready(url: str, tiny_model_dir_b: Path) -> None:
    async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=120) as http:
        loaded = await http.post(
            "/v1/models/load", json={"name": "tiny-b", "source": str(tiny_model_dir_b)}
        )
        models = {m["name"]: m for m in (await http.get("/v1/models")).json()["models"]}
    assert loaded.status_code == 200, loaded.text[:300]
    assert loaded.json()["state"] == "ready" and not loaded.json()["active"]
    assert models["tiny-b"]["state"] == "ready" and not models["tiny-b"]["active"]
    assert models["tiny"]["state"] == "serving" and models["tiny"]["active"]


async def test_only_an_admin_sees_where_models_live(url: str, tiny_model_dir: Path) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        public = await http.get("/v1/models")
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        admin = await http.get("/v1/models", headers=ADMIN)
    for answer in (public, wrong):
        assert answer.status_code == 200
        [model] = answer.json()["models"]
        assert model["source"] == tiny_model_dir.name
        assert str(tiny_model_dir.parent) not in answer.text
    [model] = admin.json()["models"]
    assert model["source"] == str(tiny_model_dir.resolve())


async def test_a_bearer_token_with_other_than_ascii_is_refused_not_failed(url: str) -> None:
    # compare_digest refuses str with non-ASCII characters (it raised: a 500).
    headers = {"Authorization": b"Bearer caf\xc3\xa9"}
    async with httpx.AsyncClient(base_url=url) as http:
        swap = await http.post("/v1/models/swap", json={"name": "tiny"}, headers=headers)
        models = await http.get("/v1/models", headers=headers)
    assert swap.status_code == 403 and swap.json()["code"] == "forbidden"
    assert models.status_code == 200 and models.json()["models"][0]["source"] == "tiny"
