"""``timed``: a block's wall time into a metrics row."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def timed(key: str, metrics: dict[str, Any]) -> Iterator[None]:
    """Set ``metrics[key]`` to the seconds the block took (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - start
