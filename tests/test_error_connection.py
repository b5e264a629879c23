"""Error answers over a real connection: an unexpected exception answers a 500 ErrorBody and
leaves the keep-alive connection usable; the score route's fast path (FastPathMiddleware)
answers every request, errors included, exactly as the FastAPI route does."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fastapi import FastAPI

from client.protocol import ErrorBody
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from services.teacher.app import create_app as create_teacher_app
from services.teacher.settings import TeacherSettings


def with_failing_route(app: FastAPI) -> FastAPI:
    """``app`` plus a test-only route whose handler raises an unexpected exception."""

    @app.post("/test-only/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("boom: a bug in a route")

    return app


def client_port(response: httpx.Response) -> int:
    """The local port of the connection ``response`` came back on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize(
    "make_app",
    [lambda: create_env_app(EnvSettings()), lambda: create_teacher_app(TeacherSettings())],
    ids=["env", "teacher"],
)
def test_a_500_keeps_the_connection_usable(serve, make_app, caplog) -> None:
    url = serve(with_failing_route(make_app()))
    with caplog.at_level(logging.ERROR), httpx.Client(base_url=url, timeout=10) as http:
        failed = http.post("/test-only/boom", json={"unused": True})
        fine = http.get("/healthz")
        again = http.post("/test-only/boom")
        still_fine = http.get("/healthz")
        ports = {client_port(r) for r in (failed, fine, again, still_fine)}
    assert failed.status_code == 500 and again.status_code == 500
    assert ErrorBody.model_validate(failed.json()).code == "internal_error"
    assert fine.status_code == 200 and still_fine.status_code == 200
    # All four went over one connection: the server did not close it after the 500s.
    assert len(ports) == 1, ports
    # The traceback was logged.
    assert any("boom: a bug in a route" in (r.exc_text or "") for r in caplog.records)


# --------------------------------------------------------------------------- the score fast path

SCORE = {"sequences": [{"input_ids": [5, 6, 7, 8, 9, 10], "spans": [{"start": 2, "end": 6}]}]}
# The fast path takes exactly this content type; with a charset, FastAPI's route answers.
FAST = {"content-type": "application/json"}
ROUTE = {"content-type": "application/json; charset=utf-8"}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (SCORE, {}),
        ({**SCORE, "top_k": 3}, {"X-Client-Id": "trainer-1"}),
        ({"sequences": []}, {}),  # refused by ScoreRequest
        ({**SCORE, "unknown": 1}, {}),
        ({"sequences": [{"input_ids": [5, 10**7], "spans": [{"start": 1, "end": 2}]}]}, {}),
        (SCORE, {"X-Client-Id": "x" * 129}),  # refused by the header's limit
        ("not json", {}),
        ({**SCORE, "deadline_s": 1e-9}, {}),  # 504 from the batcher
    ],
)
def test_the_score_fast_path_answers_as_the_route(
    serve,
    tiny_model_dir,
    body: object,
    headers: dict[str, str],
) -> None:
    settings = TeacherSettings(model=str(tiny_model_dir), model_name="tiny", device="cpu")
    url = serve(create_teacher_app(settings))
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with httpx.Client(base_url=url, timeout=30) as http:
        fast = http.post("/v1/score", content=content, headers={**FAST, **headers})
        route = http.post("/v1/score", content=content, headers={**ROUTE, **headers})
    assert fast.status_code == route.status_code
    assert fast.headers["content-type"] == route.headers["content-type"]
    assert fast.content == route.content
