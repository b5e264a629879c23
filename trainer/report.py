"""`sage-opd report RUN_DIR...`: the comparison's table (markdown) and plots (PNG).

A run is a folder with the trainer's metrics.jsonl and config.json (a grid's
``<method>/seed-<n>``); a RUN_DIR may be a run, any folder above runs, or a
report's runs.jsonl. Runs are grouped by method (their parent folder's name) and
summarised over seeds as mean +- std (sample std; 0 for one seed). The report
keeps what it read in one runs.jsonl (a line per run: method, seed, student,
wall time and metrics rows, in the table's order), from which it regenerates the
same table.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.experiment import DONE_FILE

SPLITS = ("valid_seen", "valid_unseen")  # in this order where a run evaluated them
BASELINE, PROPOSED = "opd", "sage"  # the relative-improvement line compares these
WARM_START = "warm-start"  # the untrained student: the level every method must beat
RECORDS_FILE = "runs.jsonl"


@dataclass
class Run:
    method: str
    seed: int
    student: str  # the model it started from (runs with the same one share step 0)
    rows: list[dict[str, Any]]
    wall_s: float
    folder: Path | None = None  # None when read from a runs.jsonl

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if any(f"eval_{s}_success" in r for s in SPLITS)]

    @property
    def final(self) -> dict[str, Any]:
        return self.evaluations[-1]

    def mean_over_steps(self, key: str) -> float | None:
        values = [r[key] for r in self.rows if r["step"] > 0 and key in r]
        return statistics.fmean(values) if values else None


def splits_of(runs: list[Run]) -> list[str]:
    """The evaluated splits, in SPLITS' order; the last is the headline."""
    return [s for s in SPLITS if any(f"eval_{s}_success" in r for run in runs for r in run.rows)]


def load_run(folder: Path) -> Run:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((folder / "config.json").read_text())
    # The phases the trainer timed (rollouts, training, evaluation), which count each
    # step once however often the run was resumed; else the runner's clock.
    wall_s = sum(v for r in rows for k, v in r.items() if k.startswith("time_"))
    done = folder / DONE_FILE
    if not wall_s and done.exists():
        wall_s = json.loads(done.read_text())["wall_s"]
    seed, student = int(config["seed"]), config["student"]
    return Run(folder.parent.name, seed, student, rows, wall_s, folder)


def load_records(path: Path) -> list[Run]:
    """The runs a report kept in ``path`` (its runs.jsonl)."""
    return [Run(**json.loads(line)) for line in path.read_text().splitlines()]


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under ``paths`` (a run folder, a folder above runs, or a runs.jsonl)."""
    runs: list[Run] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder")
        if path.is_file():
            runs += load_records(path)
            continue
        found = [m.parent for m in sorted(path.rglob("metrics.jsonl"))]
        if not found:
            raise FileNotFoundError(f"{path}: holds no run (no metrics.jsonl under it)")
        runs += [load_run(folder) for folder in found if (folder / "config.json").exists()]
    share_start(runs)
    return runs


def share_start(runs: list[Run]) -> None:
    """Give a run trained with ``eval_at_start: false`` the step-0 evaluation of a run
    with the same student (greedy evaluation of the same weights: the same numbers)."""
    starts = {
        r.student: r.evaluations[0] for r in runs if r.evaluations and r.evaluations[0]["step"] == 0
    }
    for run in runs:
        start = starts.get(run.student)
        if start is not None and not any(r["step"] == 0 for r in run.evaluations):
            run.rows.insert(0, start)


def group_by_method(runs: list[Run], order: list[str] | None = None) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    for group in groups.values():
        group.sort(key=lambda r: r.seed)
    names = [m for m in order or [] if m in groups] + [m for m in groups if m not in (order or [])]
    return {name: groups[name] for name in names}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], percent: bool = True, digits: int = 1) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if percent:
        return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired(groups: dict[str, list[Run]], a: str, b: str, key: str) -> dict[int, float]:
    """``key`` at the final evaluation, method ``a`` minus method ``b``, per shared seed."""
    first = {r.seed: r.final[key] for r in groups[a] if key in r.final}
    second = {r.seed: r.final[key] for r in groups[b] if key in r.final}
    return {seed: first[seed] - second[seed] for seed in sorted(set(first) & set(second))}


def relative_improvement(groups: dict[str, list[Run]], split: str) -> str:
    """SAGE-OPD over OPD on ``split``, paired by seed: (sage - opd) / opd."""
    if BASELINE not in groups or PROPOSED not in groups:
        return f"Relative improvement: needs runs of both {BASELINE!r} and {PROPOSED!r}."
    key = f"eval_{split}_success"
    differences = paired(groups, PROPOSED, BASELINE, key)
    seeds = list(differences)
    line = (
        f"SAGE-OPD minus OPD on {split} success: {_pm(list(differences.values()))} points "
        f"(paired over seeds {seeds})"
    )
    opd = {r.seed: r.final[key] for r in groups[BASELINE]}
    ratios = [differences[s] / opd[s] for s in seeds if opd[s] > 0]
    if len(ratios) == len(seeds) and seeds:
        line += f"; relative improvement {_pm(ratios)}%"
    else:
        line += "; relative improvement undefined (OPD succeeded on no task for some seed)"
    return line + "."


def effects(groups: dict[str, list[Run]], split: str) -> list[str]:
    """What each part of SAGE-OPD adds on ``split``: SAGE-OPD minus each of its ablations
    (methods named sage-no-*), and minus OPD under each other divergence (sage-X vs opd-X),
    paired by seed."""
    key = f"eval_{split}_success"
    lines = []
    for method in groups:
        if method.startswith(f"{PROPOSED}-no-"):
            part = method.removeprefix(f"{PROPOSED}-no-")
            values = list(paired(groups, PROPOSED, method, key).values())
            lines.append(f"- {part}: SAGE-OPD minus `{method}`: {_pm(values)} points")
        suffix = method.removeprefix(f"{PROPOSED}-")
        if method.startswith(f"{PROPOSED}-") and f"{BASELINE}-{suffix}" in groups:
            values = list(paired(groups, method, f"{BASELINE}-{suffix}", key).values())
            lines.append(
                f"- under {suffix}: `{method}` minus `{BASELINE}-{suffix}`: {_pm(values)} points"
            )
    if not lines:
        return []
    return [f"Effects on {split} success (paired by seed, mean ± std):", *lines]


def table(groups: dict[str, list[Run]], splits: list[str]) -> str:
    """The markdown table: one row per method, mean ± std over its seeds.

    "vs warm start": the final success on the first split minus the warm start's (the
    untrained student), per seed: a method has improved the student where its mean is
    above 0 by more than its spread."""
    headline, first = splits[-1], splits[0]
    short = headline.removeprefix("valid_")
    header = (
        "| method | seeds | "
        + " | ".join(f"{s} success %" for s in splits)
        + f" | {first} vs warm start (points) | {short} repeated % | {short} invalid % "
        "| Skip % | Weak % | Strong % | teacher tokens (M) | time (min) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    warm = groups.get(WARM_START)
    start = statistics.fmean(r.final[f"eval_{first}_success"] for r in warm) if warm else None
    for method, runs in groups.items():

        def labels(name: str, runs: list[Run] = runs) -> str:
            values = [v for r in runs if (v := r.mean_over_steps(name)) is not None]
            return _pm(values)

        finals = [r.final for r in runs]
        gains = [] if start is None else [f[f"eval_{first}_success"] - start for f in finals]
        cells = [
            method,
            ",".join(str(r.seed) for r in runs),
            *(_pm([f[f"eval_{s}_success"] for f in finals]) for s in splits),
            _pm(gains),
            _pm([f[f"eval_{headline}_repeated_rate"] for f in finals]),
            _pm([f[f"eval_{headline}_invalid_rate"] for f in finals]),
            labels("label_skip"),
            labels("label_weak"),
            labels("label_strong"),
            _pm([r.rows[-1].get("teacher_tokens_total", 0) / 1e6 for r in runs], False, 2),
            _pm([r.wall_s / 60 for r in runs], False, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(groups: dict[str, list[Run]], split: str) -> str:
    """The student's search decisions at the final evaluation (trainer/diagnostics.py)."""
    prefix = f"diag_{split}"
    header = (
        "| method | decisions in view | says not % (in view) | says not % (not in view) "
        "| teacher says not % (in view) | teacher log-prob in view: right | wrong | not |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for method, runs in groups.items():
        finals = [r.final for r in runs]

        def cell(key: str, percent: bool = True, digits: int = 1, finals: list = finals) -> str:
            values = [f[f"{prefix}_{key}"] for f in finals if f"{prefix}_{key}" in f]
            return _pm(values, percent, digits)

        cells = [
            method,
            cell("in_view_decisions", False, 0),
            cell("in_view_says_not"),
            cell("not_in_view_says_not"),
            cell("in_view_teacher_says_not"),
            *(cell(f"in_view_teacher_lp_{a}", False, 2) for a in ("right", "wrong", "not")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(groups: dict[str, list[Run]]) -> str:
    runs = [run for group in groups.values() for run in group]
    splits = splits_of(runs)
    headline = splits[-1]
    steps = sorted({r.final["step"] for r in runs})
    parts = [
        table(groups, splits),
        relative_improvement(groups, headline),
        "\n".join(effects(groups, headline)),
        f"Final evaluation at step(s) {steps}; greedy; label fractions and teacher tokens "
        "over the training steps (Skip / Weak / Strong are read only by SAGE-OPD with "
        "intervention; the other methods count every turn Strong). Time: the run's "
        "rollouts, training and evaluation as the trainer timed them.",
    ]
    if any(f"diag_{headline}_in_view_decisions" in r.final for r in runs):
        parts += [
            f"Search decisions on {headline} at the final evaluation: the turns whose "
            "thought says whether the sought object is in view; how often the student "
            'says "not here", how often the teacher would rather say " not" than the '
            "number in view, and the teacher's mean log-prob, at the decision token, of "
            'the number in view, a wrong number and " not" (trainer/diagnostics.py):',
            diagnostics_table(groups, headline),
        ]
    return "\n\n".join(part for part in parts if part)


def _curve(
    runs: list[Run], x_key: str, y_key: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over seeds of ``y_key`` at the evaluations they share."""
    points = [{r["step"]: (r.get(x_key, 0), r[y_key]) for r in run.evaluations} for run in runs]
    steps = sorted(set.intersection(*(set(p) for p in points)))
    xs = [statistics.fmean(p[s][0] for p in points) for s in steps]
    ys = [[p[s][1] for p in points] for s in steps]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot(
    groups: dict[str, list[Run]],
    x_key: str,
    xlabel: str,
    path: Path,
    metric: str = "success",
    ylabel: str = "success %",
) -> Path:
    """``eval_<split>_<metric>`` against ``x_key`` on each split: a line per method, a
    band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = splits_of([run for group in groups.values() for run in group])
    figure, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), sharey=True)
    axes = list(axes) if len(splits) > 1 else [axes]
    for axis, split in zip(axes, splits, strict=True):
        _distinct_lines(axis)
        for method, runs in groups.items():
            xs, mean, low, high = _curve(runs, x_key, f"eval_{split}_{metric}")
            if len(xs) == 1:  # no training (e.g. the warm start): a level line
                axis.axhline(100 * mean[0], linestyle=":", color="gray", label=method)
                continue
            (line,) = axis.plot(xs, [100 * m for m in mean], marker="o", label=method)
            axis.fill_between(
                xs,
                [100 * v for v in low],
                [100 * v for v in high],
                color=line.get_color(),
                alpha=0.15,
            )
        axis.set_title(split)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    top = max(axis.get_ylim()[1] for axis in axes)
    axes[0].set_ylim(0, max(10.0, min(100.0, 1.1 * top)))  # all-zero curves: no 1e-17 scale
    axes[0].set_ylabel(f"{ylabel} (greedy; band: min-max over seeds)")
    axes[-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _distinct_lines(axis: Any) -> None:
    """Ten colours, solid then dashed: twenty methods stay apart on one plot."""
    from cycler import cycler
    from matplotlib import colormaps

    axis.set_prop_cycle(
        cycler(linestyle=["-", "--"]) * cycler(color=list(colormaps["tab10"].colors))
    )


def plot_training(groups: dict[str, list[Run]], key: str, ylabel: str, path: Path) -> Path | None:
    """A training metric (e.g. kl_estimate) against the step: a line per method that
    logged it, a band over seeds. None when no run logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    _distinct_lines(axis)
    drawn = False
    for method, runs in groups.items():
        points = [
            {r["step"]: r[key] for r in run.rows if r["step"] > 0 and key in r} for run in runs
        ]
        steps = sorted(set.intersection(*(set(p) for p in points)))
        if not steps:
            continue
        values = [[p[s] for p in points] for s in steps]
        (line,) = axis.plot(steps, [statistics.fmean(v) for v in values], label=method)
        low, high = [min(v) for v in values], [max(v) for v in values]
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axis.set_xlabel("training step")
    axis.set_ylabel(f"{ylabel} (band: min-max over seeds)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def method_order(paths: list[Path]) -> list[str]:
    """The methods in the order of the first grid.yaml among ``paths`` (else: as found)."""
    import yaml

    for path in paths:
        if (path / "grid.yaml").exists():
            return list(yaml.safe_load((path / "grid.yaml").read_text())["methods"])
    return []


def write_report(paths: list[Path], out: Path) -> Path:
    """Table, plots and runs.jsonl (what they were computed from) under ``out``."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError("no run found under " + ", ".join(map(str, paths)))
    groups = group_by_method(runs, method_order(paths))
    out.mkdir(parents=True, exist_ok=True)
    keep = ("method", "seed", "student", "wall_s", "rows")
    with (out / RECORDS_FILE).open("w") as f:
        for run in (run for group in groups.values() for run in group):
            f.write(json.dumps({k: getattr(run, k) for k in keep}) + "\n")
    (out / "table.md").write_text(markdown(groups) + "\n")
    plot(groups, "step", "training step", out / "success_vs_steps.png")
    plot(groups, "teacher_tokens_total", "teacher tokens", out / "success_vs_teacher_tokens.png")
    for metric in ("invalid_rate", "repeated_rate"):
        label = metric.replace("_rate", " actions %")
        plot(groups, "step", "training step", out / f"{metric}_vs_steps.png", metric, label)
    plot_training(groups, "kl_estimate", "KL on own samples", out / "kl_vs_steps.png")
    return out / "table.md"
