"""The teacher's HTTP routes, one APIRouter a module: native (score, judge, episode, the
model list), admin (load, swap, unload) and openai (the OpenAI-compatible completions).

ERRORS: the error answers every route may give, for the OpenAPI description.
"""

from __future__ import annotations

from typing import Any

from client.protocol import ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503, 504)
}
