"""The reliability scenarios short enough for the suite, run as benchmarks/reliability.py
runs them (services as their own processes on loopback), in their quick form.

The others have their tests where they act: a service killed and restarted mid-run and
a trainer killed while it checkpoints in tests/trainer/test_faults.py, a client waiting
for a service that comes back in tests/trainer/test_faults.py, the services' OpenAPI
fuzzed in tests/test_openapi_fuzz.py (the script runs it with every check)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"


@pytest.fixture(scope="module")
def reliability():
    spec = importlib.util.spec_from_file_location("reliability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scenario", ["load", "sessions", "swap"])
def test_the_scenario_holds(reliability, scenario: str) -> None:
    outcome = reliability.SCENARIOS[scenario](True)
    assert outcome.held, reliability.format_row(outcome)
