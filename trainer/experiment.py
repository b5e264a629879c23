"""The paper's comparison as a grid: methods x seeds, side by side, against one shared stack.

`sage-opd experiment --grid configs/grid-tiny.yaml` prepares the models (cached),
starts one env service and one teacher service serving the prepared teacher, and
runs every (method, seed) as its own `sage-opd train` process with one torch
thread, ``workers`` at a time. A run's folder is ``OUT/<method>/seed-<n>``; a run
that finished has a ``done.json`` there and is not run again, and an interrupted
one resumes from its newest checkpoint (the trainer's own resume).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from trainer.config import Frozen, PrepareConfig, TrainConfig, apply_overrides, load_config
from trainer.stack import stop_with_parent

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
TEACHER_PLACEHOLDER = "{teacher}"  # in a method's fields: the prepared teacher's folder


class GridConfig(Frozen):
    """Methods x seeds of one comparison; every method starts from the same train config."""

    train: str  # TrainConfig YAML that every method starts from
    # The models: a PrepareConfig YAML (tiny models, built or found in the cache), or
    # a student and a teacher by folder or HF id (the paper's scale).
    prepare: str | None = None
    student: str | None = None
    teacher: str | None = None
    teacher_args: list[str] = []  # for `python -m services.teacher`, e.g. --backend vllm
    services_env: dict[str, str] = {}  # e.g. SAGE_ENV_ENVIRONMENTS: alfworld
    seeds: list[int] = [0, 1, 2]
    workers: int = Field(2, ge=1)  # runs side by side
    threads: int = Field(1, ge=1)  # torch threads per run
    # method name -> the TrainConfig fields it changes, as dotted keys ("loss.kind": "opd");
    # a method's own `seeds` list replaces the grid's for that method
    methods: dict[str, dict[str, Any]]

    def seeds_of(self, method: str) -> list[int]:
        return list(self.methods[method].get("seeds", self.seeds))

    @model_validator(mode="after")
    def _one_source_of_models(self) -> GridConfig:
        if (self.prepare is None) == (self.student is None or self.teacher is None):
            raise ValueError("give either prepare, or both student and teacher")
        for method in self.methods:
            seeds = self.seeds_of(method)
            if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
                raise ValueError(f"{method}: seeds must be a non-empty list of seeds >= 0")
        return self


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    folder: Path
    config: TrainConfig


def run_specs(
    grid: GridConfig, out: Path, student: str, teacher: str, urls: dict[str, str]
) -> list[RunSpec]:
    """Every run of the grid, seed-major (one full row of methods before the next seed)."""
    base = yaml.safe_load(Path(grid.train).read_text()) or {}
    specs = []
    seeds = sorted({seed for method in grid.methods for seed in grid.seeds_of(method)})
    for seed in seeds:
        for method, fields in grid.methods.items():
            if seed not in grid.seeds_of(method):
                continue
            folder = out / method / f"seed-{seed}"
            overrides = [
                f"{key}={json.dumps(value).replace(TEACHER_PLACEHOLDER, teacher)}"
                for key, value in fields.items()
                if key != "seeds"
            ]
            data = apply_overrides(json.loads(json.dumps(base)), overrides)
            data.update(
                student=student,
                teacher_urls=[urls["teacher"]],
                env_url=urls["env"],
                out_dir=str(folder),
                seed=seed,
            )
            specs.append(RunSpec(method, seed, folder, TrainConfig.model_validate(data)))
    return specs


def is_done(folder: Path) -> bool:
    return (folder / DONE_FILE).exists()


def _rows_logged(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _launch(spec: RunSpec, threads: int) -> subprocess.Popen:
    spec.folder.mkdir(parents=True, exist_ok=True)
    config_path = spec.folder / "train.yaml"
    config_path.write_text(yaml.safe_dump(spec.config.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "trainer.cli", "train", "--config", str(config_path)]
    with (spec.folder / "train.log").open("a") as log_file:
        return subprocess.Popen(
            [*command, "--quiet"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=stop_with_parent,  # a killed grid leaves no run behind
        )


def run_all(specs: list[RunSpec], workers: int, threads: int, progress: bool = True) -> list[str]:
    """Run the specs not done yet, ``workers`` at a time; returns the failures' descriptions."""
    pending = [s for s in specs if not is_done(s.folder)]
    total_rows = sum(s.config.steps + 1 for s in specs)  # step 0's evaluation, then each step
    bar = tqdm(total=total_rows, desc="grid", unit="step", disable=not progress)
    running: dict[subprocess.Popen, tuple[RunSpec, float]] = {}
    failures: list[str] = []
    finished = len(specs) - len(pending)
    try:
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.pop(0)
                running[_launch(spec, threads)] = (spec, time.perf_counter())
            time.sleep(1.0)
            for process in [p for p in running if p.poll() is not None]:
                spec, started = running.pop(process)
                if process.returncode == 0:
                    wall_s = time.perf_counter() - started
                    (spec.folder / DONE_FILE).write_text(json.dumps({"wall_s": wall_s}))
                    finished += 1
                else:
                    failures.append(
                        f"{spec.method} seed {spec.seed}: exit {process.returncode}, "
                        f"see {spec.folder / 'train.log'}"
                    )
            bar.n = sum(min(_rows_logged(s.folder), s.config.steps + 1) for s in specs)
            bar.set_postfix(runs=f"{finished}/{len(specs)}", running=len(running))
            bar.refresh()
    finally:  # interrupted: stop the runs in flight (they resume from checkpoints)
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
        bar.close()
    return failures


def run_grid(
    grid_path: str, out: Path, artifacts: Path = Path("artifacts"), progress: bool = True
) -> list[str]:
    """Prepare, bring the stack up, run the grid; returns the failures (empty: all done)."""
    from trainer.prepare import prepare
    from trainer.stack import local_stack

    grid = load_config(GridConfig, grid_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False))
    if grid.prepare is not None:
        prepare_config = load_config(PrepareConfig, grid.prepare)
        models = prepare(prepare_config, artifacts, evaluate=False, progress=progress)
        teacher, student = str(models / "teacher"), str(models / "student-init")
    else:
        assert grid.student is not None and grid.teacher is not None
        teacher, student = grid.teacher, grid.student
    with local_stack(teacher, teacher_args=grid.teacher_args, env=grid.services_env) as services:
        urls = {name: service.url for name, service in services.items()}
        specs = run_specs(grid, out, student, teacher, urls)
        return run_all(specs, grid.workers, grid.threads, progress)
