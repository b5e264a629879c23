"""The committed results are what `sage-opd report` makes of the committed metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.report import write_report

RESULTS = sorted(p.parent for p in (Path(__file__).parent.parent / "results").glob("*/table.md"))


def test_results_are_committed() -> None:
    assert RESULTS, "results/<name>/table.md is missing"


@pytest.mark.parametrize("folder", RESULTS, ids=[p.name for p in RESULTS])
def test_the_committed_table_is_regenerated_from_the_committed_metrics(
    folder: Path, tmp_path: Path
) -> None:
    table = write_report([folder / "runs.jsonl"], tmp_path)
    assert table.read_text() == (folder / "table.md").read_text()
