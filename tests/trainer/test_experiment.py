"""The comparison grid end to end: tiny prepared models, real services, real train processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.trainer.test_prepare import TINY
from trainer.cli import app
from trainer.experiment import DONE_FILE, GridConfig, run_specs
from trainer.report import find_runs

METHODS = {
    "warm-start": {"steps": 0},
    "sft-teacher": {"loss.kind": "sft", "sft_policy": "{teacher}"},
    "opd": {"loss.kind": "opd"},
    "sage": {},
}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished grid of four methods x one seed, one step each."""
    root = tmp_path_factory.mktemp("grid")
    (root / "prepare.yaml").write_text(yaml.safe_dump(TINY.model_dump(mode="json")))
    train = {
        "student": "set-by-the-grid",
        "history": None,
        "max_turns": 3,
        "max_new_tokens": 6,
        "episodes_per_step": 2,
        "steps": 1,
        "eval_at_start": False,
        "eval_tasks": 2,
        "checkpoint_every": 1,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    spec = {
        "prepare": str(root / "prepare.yaml"),
        "train": str(root / "train.yaml"),
        "seeds": [0],
        "workers": 2,
        "methods": METHODS,
    }
    (root / "grid.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    args = ["experiment", "--grid", str(root / "grid.yaml"), "--out", str(root / "runs")]
    result = CliRunner().invoke(app, [*args, "--artifacts", str(root / "artifacts"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root


def test_every_method_runs_once_against_the_shared_stack(grid: Path) -> None:
    runs = {run.method: run for run in find_runs([grid / "runs"])}
    assert sorted(runs) == sorted(METHODS)
    assert all((run.folder / DONE_FILE).exists() for run in runs.values())
    assert [r["step"] for r in runs["warm-start"].rows] == [0]
    for method in ("sft-teacher", "opd", "sage"):
        # Trained one step; step 0's evaluation is the warm start's (same student).
        assert [r["step"] for r in runs[method].rows] == [0, 1]
        assert runs[method].rows[0] == runs["warm-start"].rows[0]
    configs = {m: json.loads((r.folder / "config.json").read_text()) for m, r in runs.items()}
    urls = {(c["env_url"], tuple(c["teacher_urls"])) for c in configs.values()}
    assert len(urls) == 1  # one env service and one teacher service for the whole grid
    teacher = configs["sft-teacher"]["sft_policy"]
    assert teacher.endswith("teacher") and Path(teacher).is_dir()
    assert configs["opd"]["loss"]["kind"] == "opd" and configs["sage"]["loss"]["kind"] == "sage"


def test_a_finished_grid_is_not_run_again(grid: Path) -> None:
    done = {p: p.stat().st_mtime_ns for p in (grid / "runs").rglob(DONE_FILE)}
    args = ["experiment", "--grid", str(grid / "grid.yaml"), "--out", str(grid / "runs")]
    result = CliRunner().invoke(app, [*args, "--artifacts", str(grid / "artifacts"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in (grid / "runs").rglob(DONE_FILE)} == done


def test_report_writes_a_table_in_grid_order_and_plots(grid: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(grid / "runs"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:6]]
    assert rows == list(METHODS)
    for name in ("success_vs_steps.png", "success_vs_teacher_tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The runs it kept regenerate the same table.
    again = CliRunner().invoke(
        app, ["report", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "b")]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "b" / "table.md").read_text() == table


def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code != 0 and "holds no run" in result.output


def test_a_method_can_run_more_seeds_than_the_grid(tmp_path: Path) -> None:
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"student": "s", "steps": 1}))
    grid = GridConfig(
        train=str(tmp_path / "train.yaml"),
        student="s",
        teacher="t",
        seeds=[0, 1],
        methods={"opd": {"loss.kind": "opd", "seeds": [0, 1, 2, 3]}, "sage": {}},
    )
    urls = {"env": "http://127.0.0.1:1", "teacher": "http://127.0.0.1:2"}
    specs = run_specs(grid, tmp_path / "runs", "s", "t", urls)
    assert [(spec.method, spec.seed) for spec in specs] == [
        ("opd", 0),
        ("sage", 0),
        ("opd", 1),
        ("sage", 1),
        ("opd", 2),
        ("opd", 3),
    ]
    assert specs[-1].config.loss.kind == "opd" and specs[-1].config.seed == 3
    with pytest.raises(ValueError, match="seeds"):
        GridConfig(train="x", student="s", teacher="t", methods={"opd": {"seeds": []}})
