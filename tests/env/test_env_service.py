"""The env service through its client, on a real uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest

from client.env import EnvClient, RetryPolicy, ServiceCallError
from client.protocol import CreateSessionRequest, ErrorBody, ExpertAction
from services.env.app import create_app
from services.env.household import HouseholdEnvironment
from services.env.settings import EnvSettings
from services.http import running_server
from trainer.stack import free_port

FAST_RETRY = RetryPolicy(attempts=1)


def make_app(**settings):
    return create_app(EnvSettings(**settings))


@pytest.fixture
def url(serve) -> str:
    return serve(make_app())


async def test_expert_plays_a_whole_episode_to_a_win(url: str) -> None:
    async with EnvClient(url) as client:
        created = await client.create_session(split="valid_unseen", task_id=3)
        assert created.task.split == "valid_unseen" and created.task.task_id == 3
        assert created.first.turn == 0 and not created.first.done
        assert "Your task is to:" in created.first.observation
        result = created.first
        while not result.done:
            action = await client.expert_action(created.session_id)
            assert action in await client.admissible_actions(created.session_id)
            result = await client.step(created.session_id, action)
        assert result.won and not result.truncated and result.score == 1.0
        info = await client.session(created.session_id)
        assert info.done and info.won and info.turn == result.turn
        assert await client.expert_action(created.session_id) is None
        await client.close_session(created.session_id)
        with pytest.raises(ServiceCallError) as caught:
            await client.session(created.session_id)
        assert caught.value.status == 404


async def test_reset_restarts_the_episode(url: str) -> None:
    async with EnvClient(url) as client:
        created = await client.create_session(split="train", task_id=7)
        await client.step(created.session_id, "look")
        again = await client.reset(created.session_id)
        assert again.turn == 0 and again.observation == created.first.observation


async def test_unknown_session_is_404_everywhere(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        calls = [
            http.get("/v1/sessions/nope"),
            http.post("/v1/sessions/nope/step", json={"action": "look"}),
            http.post("/v1/sessions/nope/reset"),
            http.get("/v1/sessions/nope/admissible"),
            http.get("/v1/sessions/nope/expert"),
            http.delete("/v1/sessions/nope"),
        ]
        for response in await asyncio.gather(*calls):
            assert response.status_code == 404
            assert ErrorBody.model_validate(response.json()).code == "session_not_found"


async def test_unknown_environment_or_task_is_404(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        bad_env = await http.post("/v1/sessions", json={"env": "nowhere"})
        bad_task = await http.post("/v1/sessions", json={"split": "valid_seen", "task_id": 140})
    assert bad_env.status_code == 404 and bad_env.json()["code"] == "environment_not_found"
    assert bad_task.status_code == 404 and bad_task.json()["code"] == "task_not_found"


async def test_stepping_a_finished_episode_is_409(url: str) -> None:
    async with EnvClient(url, retry=FAST_RETRY) as client:
        created = await client.create_session(split="train", task_id=1, max_turns=2)
        await client.step(created.session_id, "look")
        last = await client.step(created.session_id, "look")
        assert last.done and last.truncated and not last.won and last.turn == 2
        with pytest.raises(ServiceCallError) as caught:
            await client.step(created.session_id, "look")
    assert caught.value.status == 409 and caught.value.error.code == "episode_finished"


async def test_oversize_body_is_413(serve) -> None:
    url = serve(make_app(max_body_bytes=4096))
    big = {"action": "x" * 5000}
    async with httpx.AsyncClient(base_url=url) as http:
        declared = await http.post("/v1/sessions/any/step", json=big)

        async def chunks():  # no Content-Length: the bytes are counted
            for _ in range(10):
                yield b" " * 1024

        streamed = await http.post(
            "/v1/sessions/step", content=chunks(), headers={"Content-Type": "application/json"}
        )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "body",
    [
        {},  # missing action
        {"action": 3},  # wrong type
        {"action": "look", "extra": 1},  # unknown field
        {"action": "a" * 1001},  # longer than MAX_ACTION_CHARS
    ],
)
async def test_bad_step_bodies_are_422(url: str, body: dict) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        created = (await http.post("/v1/sessions", json={})).json()
        response = await http.post(f"/v1/sessions/{created['session_id']}/step", json=body)
    assert response.status_code == 422
    error = ErrorBody.model_validate(response.json())
    assert error.code == "invalid_request" and error.detail


async def test_invalid_json_and_bad_create_fields_are_422(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        broken = await http.post(
            "/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        bad_split = await http.post("/v1/sessions", json={"split": "test"})
        negative = await http.post("/v1/sessions", json={"task_id": -1})
    assert [r.status_code for r in (broken, bad_split, negative)] == [422, 422, 422]


async def test_session_cap_answers_503_with_retry_after(serve) -> None:
    url = serve(make_app(max_sessions=2, session_ttl_s=30))
    async with EnvClient(url, retry=FAST_RETRY) as client:
        await client.create_session(task_id=0)
        await client.create_session(task_id=1)
        with pytest.raises(ServiceCallError) as caught:
            await client.create_session(task_id=2)
    assert caught.value.status == 503 and caught.value.error.code == "session_cap"
    assert caught.value.retry_after_s is not None and 1 <= caught.value.retry_after_s <= 30


async def test_idle_sessions_are_evicted_after_the_ttl(serve) -> None:
    url = serve(make_app(session_ttl_s=0.3))
    async with EnvClient(url, retry=FAST_RETRY) as client:
        created = await client.create_session()
        kept = await client.create_session(task_id=1)
        for _ in range(6):  # keep one session busy, leave the other idle
            await asyncio.sleep(0.1)
            await client.admissible_actions(kept.session_id)
        await asyncio.sleep(0.3)
        with pytest.raises(ServiceCallError) as caught:
            await client.step(created.session_id, "look")
        metrics = httpx.get(f"{url}/metrics").text
    assert caught.value.status == 404
    assert "sage_env_sessions_evicted_total 1.0" in metrics or "evicted_total 2.0" in metrics


async def test_client_retries_through_the_cap_until_a_slot_frees(serve) -> None:
    url = serve(make_app(max_sessions=1, session_ttl_s=0.5))
    retrying = RetryPolicy(attempts=5, initial_wait_s=0.1, max_wait_s=2.0)
    async with EnvClient(url, retry=retrying) as client:
        await client.create_session(task_id=0)
        start = time.monotonic()
        second = await client.create_session(task_id=1)  # 503 first, then the TTL frees a slot
    assert second.task.task_id == 1
    assert time.monotonic() - start >= 0.4


async def test_client_retries_connection_errors_until_the_service_is_up() -> None:
    port = free_port()
    stop = threading.Event()

    def start_late() -> None:
        time.sleep(0.7)
        with running_server(make_app(), port=port):
            stop.wait(30)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        retrying = RetryPolicy(attempts=10, initial_wait_s=0.2, max_wait_s=1.0)
        async with EnvClient(f"http://127.0.0.1:{port}", retry=retrying) as client:
            created = await client.create_session(task_id=5)
        assert created.task.task_id == 5
    finally:
        stop.set()
        thread.join(10)


async def test_batched_step_returns_each_sessions_result_or_error(url: str) -> None:
    async with EnvClient(url) as client:
        a = await client.create_session(task_id=0)
        b = await client.create_session(task_id=1, max_turns=1)
        await client.step(b.session_id, "look")  # b is now finished
        items = await client.step_many({a.session_id: "look", b.session_id: "look", "gone": "look"})
    by_id = {item.session_id: item for item in items}
    assert by_id[a.session_id].result is not None and by_id[a.session_id].result.turn == 1
    assert (
        by_id[b.session_id].status == 409 and by_id[b.session_id].error.code == "episode_finished"
    )
    assert by_id["gone"].status == 404 and by_id["gone"].result is None


async def test_sessions_open_and_close_in_batches(serve) -> None:
    url = serve(make_app(max_sessions=3))
    requests = [CreateSessionRequest(split="valid_seen", task_id=i) for i in (0, 1, 999, 2, 3)]
    async with EnvClient(url, retry=FAST_RETRY) as client:
        items = await client.create_sessions(requests)
        opened = [item.result.session_id for item in items if item.result is not None]
        closed = await client.close_sessions([*opened, "gone"])
    assert [item.status for item in items] == [201, 201, 404, 201, 503]
    assert items[0].result.task.task_id == 0 and items[0].result.first.turn == 0
    assert items[2].error.code == "task_not_found" and items[4].error.code == "session_cap"
    assert closed.closed == opened and closed.not_found == ["gone"]


async def test_side_by_side_steps_and_expert_questions_travel_as_one_batch_call_each(
    url: str,
) -> None:
    async with EnvClient(url) as client:
        ids = [(await client.create_session(task_id=t)).session_id for t in range(8)]
        advice = await asyncio.gather(*(client.expert(sid, steps_left=True) for sid in ids))
        actions = [a.action or "" for a in advice]
        results = await asyncio.gather(
            *(client.step(s, a) for s, a in zip(ids, actions, strict=True))
        )
    async with httpx.AsyncClient(base_url=url) as http:
        metrics = (await http.get("/metrics")).text
    family = HouseholdEnvironment()  # the same tasks played in process
    for task_id, (answer, result) in enumerate(zip(advice, results, strict=True)):
        episode = family.make("train", task_id)
        episode.reset()
        assert (answer.action, answer.steps_left) == (
            episode.expert_action(),
            episode.expert_steps_left(),
        )
        assert result.observation == episode.step(answer.action).observation
        assert result.turn == 1
    for route in ("/v1/sessions/step", "/v1/sessions/expert"):
        assert f'sage_env_request_seconds_count{{route="{route}"}} 1.0' in metrics


async def test_an_error_in_a_shared_batch_reaches_only_its_caller(url: str) -> None:
    async with EnvClient(url, retry=FAST_RETRY) as client:
        live = (await client.create_session()).session_id
        steps = await asyncio.gather(
            client.step(live, "look"), client.step("gone", "look"), return_exceptions=True
        )
        experts = await asyncio.gather(
            client.expert("gone"), client.expert(live), return_exceptions=True
        )
    assert not isinstance(steps[0], Exception) and steps[0].turn == 1
    assert isinstance(steps[1], ServiceCallError) and steps[1].status == 404
    assert steps[1].error.code == "session_not_found"
    assert isinstance(experts[0], ServiceCallError) and experts[0].status == 404
    assert not isinstance(experts[1], Exception) and experts[1].session_id == live


async def test_batched_expert_returns_each_sessions_answer_or_error(url: str) -> None:
    async with EnvClient(url) as client:
        created = await client.create_session(split="valid_seen", task_id=2)
        items = await client.expert_many([created.session_id, "gone"], steps_left=True)
        single = await client.call(  # the single-session route, for comparison
            "GET",
            f"/v1/sessions/{created.session_id}/expert",
            ExpertAction,
            params={"steps_left": "true"},
        )
    assert items[0].status == 200 and items[0].result == single
    assert items[0].result.steps_left is not None and items[0].result.steps_left > 0
    assert items[1].status == 404 and items[1].error.code == "session_not_found"


async def test_batch_naming_a_session_twice_is_422(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        steps = await http.post(
            "/v1/sessions/step",
            json={"steps": [{"session_id": "s", "action": "look"}] * 2},
        )
        experts = await http.post("/v1/sessions/expert", json={"session_ids": ["s", "s"]})
    assert steps.status_code == 422 and experts.status_code == 422


async def test_health_readiness_metrics_and_openapi(url: str) -> None:
    async with EnvClient(url) as client:
        created = await client.create_session()
        await client.step(created.session_id, "look")
        assert await client.ready()
    async with httpx.AsyncClient(base_url=url) as http:
        health = await http.get("/healthz")
        metrics = (await http.get("/metrics")).text
        openapi = (await http.get("/openapi.json")).json()
        envs = (await http.get("/v1/envs")).json()
    assert health.status_code == 200
    assert 'sage_env_steps_total{env="household"} 1.0' in metrics
    assert "sage_env_sessions 1.0" in metrics
    # The client sends even a lone step as a batch of one (client/coalesce.py).
    assert 'sage_env_request_seconds_count{route="/v1/sessions/step"}' in metrics
    assert {
        "/v1/sessions",
        "/v1/sessions/step",
        "/v1/sessions/{session_id}/step",
        "/v1/sessions/expert",
        "/v1/sessions/{session_id}/expert",
    } <= set(openapi["paths"])
    assert envs["environments"][0]["splits"]["valid_unseen"] == 134


def test_the_service_binds_loopback_by_default() -> None:
    assert EnvSettings().host == "127.0.0.1"


def test_importing_the_env_service_does_not_import_torch() -> None:
    code = (
        "import sys, services.env, services.env.app, services.env.__main__, client.env;"
        "import services.env.registry as r; r.get_family('household');"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
