"""The report's comparisons, on hand-made runs: paired differences, effects, warm-start gains."""

from __future__ import annotations

from trainer.report import Run, effects, group_by_method, markdown, relative_improvement, table


def run(method: str, seed: int, seen: float, unseen: float, **diag: float) -> Run:
    final = {
        "step": 30,
        "eval_valid_seen_success": seen,
        "eval_valid_unseen_success": unseen,
        "eval_valid_unseen_repeated_rate": 0.1,
        "eval_valid_unseen_invalid_rate": 0.2,
        **{f"diag_valid_unseen_{k}": v for k, v in diag.items()},
    }
    start = {**final, "step": 0, "eval_valid_seen_success": 0.20, "eval_valid_unseen_success": 0.2}
    rows = [start] if method == "warm-start" else [start, {"step": 1, "label_skip": 0.5}, final]
    return Run(method, seed, "student", rows, 60.0)


RUNS = [
    run("warm-start", 0, 0.20, 0.20),
    run("opd", 0, 0.25, 0.20, in_view_decisions=10.0, in_view_says_not=0.5),
    run("opd", 1, 0.27, 0.25, in_view_decisions=12.0, in_view_says_not=0.3),
    run("sage", 0, 0.30, 0.30),
    run("sage", 1, 0.29, 0.30),
    run("sage-no-confidence", 0, 0.26, 0.28),
    run("sage-no-confidence", 1, 0.27, 0.22),
]


def test_sage_minus_opd_is_paired_by_seed() -> None:
    line = relative_improvement(group_by_method(RUNS), "valid_unseen")
    # Seed 0: 0.30 - 0.20 = 10 points (+50%); seed 1: 0.30 - 0.25 = 5 points (+20%).
    assert "7.5 ± 3.5 points" in line and "relative improvement 35.0 ± 21.2%" in line


def test_each_ablation_effect_is_sage_minus_the_ablation() -> None:
    [title, confidence] = effects(group_by_method(RUNS), "valid_unseen")
    assert "valid_unseen" in title
    # Seed 0: 0.30 - 0.28 = 2; seed 1: 0.30 - 0.22 = 8 points.
    assert confidence.startswith("- confidence:") and "5.0 ± 4.2 points" in confidence


def test_the_table_gives_each_method_its_gain_over_the_warm_start() -> None:
    lines = table(group_by_method(RUNS), ["valid_seen", "valid_unseen"]).splitlines()
    opd = next(line for line in lines if line.startswith("| opd |"))
    cells = [cell.strip() for cell in opd.split("|")]
    assert cells[5] == "6.0 ± 1.4"  # valid_seen: 25 and 27 against the warm start's 20


def test_the_diagnostics_table_appears_when_runs_logged_decisions() -> None:
    text = markdown(group_by_method(RUNS))
    row = next(line for line in text.splitlines() if line.startswith("| opd |") and "11" in line)
    assert "11 ± 1" in row and "40.0 ± 14.1" in row  # decisions in view; says not %
