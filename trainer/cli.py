"""`sage-opd`: one command line for every component (services, baselines, demo).

Each sub-command imports what it needs when it runs, so `sage-opd --help` is quick
and serving the env service never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import typer

from client.protocol import Split

app = typer.Typer(help="SAGE-OPD: multi-turn on-policy distillation for LLM agents.")
env_app = typer.Typer(help="The environment service.")
teacher_app = typer.Typer(help="The teacher service.")
app.add_typer(env_app, name="env")
app.add_typer(teacher_app, name="teacher")


# The serve commands' flags default to None: a flag given overrides the service's
# setting, one left out leaves the SAGE_ENV_* / SAGE_TEACHER_* variable (or the
# setting's own default) in force.


@teacher_app.command("serve")
def teacher_serve(
    model: str = typer.Option(
        None, help="HF id, local model folder, or the folder of a GGUF file."
    ),
    model_name: str = typer.Option(None, help="The name answers carry (default: teacher)."),
    gguf_file: str = typer.Option(None, help="GGUF file name inside --model."),
    dtype: str = typer.Option(None, help="Default: float32."),
    device: str = typer.Option(None, help="Default auto: CUDA when present, else CPU."),
    backend: str = typer.Option(None, help="transformers (the default) or vllm"),
    host: str = typer.Option(None, help="Bind address (default loopback; only if you mean it)."),
    port: int = typer.Option(None, help="Default: 8200."),
) -> None:
    """Run the teacher service; flags left out come from SAGE_TEACHER_* variables."""
    from services.teacher.__main__ import serve_teacher

    serve_teacher(
        model=model,
        model_name=model_name,
        gguf_file=gguf_file,
        dtype=dtype,
        device=device,
        backend=backend,
        host=host,
        port=port,
    )


@env_app.command("serve")
def env_serve(
    host: str = typer.Option(None, help="Bind address (default loopback; only if you mean it)."),
    port: int = typer.Option(None, help="Default: 8100."),
    environments: str = typer.Option(
        None, help="Comma-separated environments to serve (default: household)."
    ),
) -> None:
    """Run the env service under uvicorn; flags left out come from SAGE_ENV_* variables."""
    from services.env.__main__ import serve_env

    serve_env(host, port, environments)


@env_app.command("play")
def env_play(
    url: str = typer.Option("http://127.0.0.1:8100", help="The env service."),
    policy: str = typer.Option("expert", help="expert or random"),
    split: str = typer.Option("valid_unseen"),
    env: str = typer.Option("household"),
    limit: int = typer.Option(0, help="Play only the first N tasks (0: all)."),
    concurrency: int = typer.Option(16),
) -> None:
    """Play a reference policy on a split through a running env service; print success."""
    if policy not in ("expert", "random"):
        raise typer.BadParameter("policy must be expert or random")
    rate, count = asyncio.run(_play(url, policy, split, env, limit, concurrency))  # type: ignore[arg-type]
    typer.echo(f"{policy} policy on {env}/{split}: success {rate:.1%} over {count} tasks")


async def _play(
    url: str, policy: str, split: Split, env: str, limit: int, concurrency: int
) -> tuple[float, int]:
    from client.env import EnvClient
    from trainer.baselines import play_split, success_rate

    async with EnvClient(url) as client:
        try:
            size = await client.split_size(env, split)
        except LookupError as exc:
            raise typer.BadParameter(str(exc)) from exc
        count = size if limit <= 0 else min(limit, size)
        episodes = await play_split(client, policy, split, list(range(count)), env, concurrency)  # type: ignore[arg-type]
    return success_rate(episodes), len(episodes)


@app.command("prepare")
def prepare_command(
    config: str = typer.Option(None, help="YAML PrepareConfig (configs/prepare-tiny.yaml)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a field: --set data.expert_tasks=100"
    ),
    out: str = typer.Option("artifacts", help="Where the cached artifacts live."),
    env_url: str = typer.Option(None, help="An env service to use; default: start one."),
    force: bool = typer.Option(False, help="Rebuild even when the cache has this config."),
    evaluate: bool = typer.Option(True, help="Measure teacher and student on valid_unseen."),
    export: str = typer.Option(
        None, help="Also copy the models and summary here (e.g. models/tiny, as shipped)."
    ),
) -> None:
    """Build the fitted tokenizer, the SFT teacher and the warm-started student (cached)."""
    import json
    from pathlib import Path

    from trainer.config import PrepareConfig, load_config
    from trainer.evaluate import ForcedResult
    from trainer.prepare import export_models, prepare

    start = time.perf_counter()
    settings = load_config(PrepareConfig, config, set_)
    folder = prepare(settings, Path(out), env_url, force=force, evaluate=evaluate)
    summary = json.loads((folder / "summary.json").read_text())
    typer.echo(f"artifacts: {folder} ({time.perf_counter() - start:.0f}s this call)")
    if export:
        typer.echo(f"models exported to {export_models(folder, Path(export))}")
    for name in ("teacher", "student"):
        part = summary[name]
        line = f"{name}: {part['parameters'] / 1e6:.2f}M parameters, {part['examples']} examples"
        if "valid_unseen" in part:
            line += f", valid_unseen success {part['valid_unseen']['success']:.1%}"
        typer.echo(line)
        if "valid_unseen_forced" in part:
            typer.echo(f"  {ForcedResult(**part['valid_unseen_forced']).line()}")
    if "dagger" in summary:
        dagger = summary["dagger"]
        for who, player in (("dagger", "teacher"), ("student_dagger", "student")):
            if who in dagger:
                part = dagger[who]
                typer.echo(
                    f"DAgger, {player} playing: {part['episodes']} episodes "
                    f"({part['deviations']:.1%} of steps off the expert's action, "
                    f"{part['won']:.1%} won)"
                )
        typer.echo(f"teacher DAgger fine-tuning: {dagger['steps']} steps")
    judge = summary["judge"]
    per_label = ", ".join(
        f"{k.split('_')[1]} {v:.1%}" for k, v in judge.items() if k.startswith("agreement_")
    )
    typer.echo(f"judge agreement on held-out examples: {judge['agreement']:.1%} ({per_label})")
    typer.echo("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()))


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="A model folder (or HF id) to evaluate."),
    split: str = typer.Option("valid_unseen"),
    env_url: str = typer.Option(None, help="An env service to use; default: start one."),
    history: int = typer.Option(None, help="Turns of history; default: the model's agent.json."),
    max_turns: int = typer.Option(None),
    limit: int = typer.Option(None, help="Only the first N tasks."),
    forced: bool = typer.Option(
        False,
        "--teacher-forced",
        help="Also score the greedy answer on each turn of the expert's own episodes, "
        "per kind of action.",
    ),
) -> None:
    """Greedy success of a model on a split, through the env service."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluate import play_greedy, summarize, teacher_forced
    from trainer.models import AgentSpec
    from trainer.prepare import env_service, expert_episodes

    agent = AgentSpec.read(model)
    if agent is None:
        typer.echo(
            f"note: {model} has no agent.json (written by prepare and by training "
            "checkpoints); rendering with the defaults: the whole history, the admissible "
            "actions shown",
            err=True,
        )
        agent = AgentSpec()
    given = {"history": history, "max_turns": max_turns}
    agent = agent.model_copy(update={k: v for k, v in given.items() if v is not None})
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model).eval()
    with env_service(env_url) as url:
        episodes = asyncio.run(play_greedy(policy, tokenizer, url, split, agent, limit))
        typer.echo(summarize(split, episodes).line())
        if forced:
            experts = asyncio.run(expert_episodes(url, split, limit, agent))
            renderer = agent.renderer(tokenizer)
            typer.echo(teacher_forced(policy, renderer, experts, agent.history).line())


@app.command("diagnose")
def diagnose_command(
    student: str = typer.Option(..., help="The model that plays (its states are measured)."),
    teacher: str = typer.Option(..., help="The model asked for its action in those states."),
    split: str = typer.Option("valid_seen"),
    limit: int = typer.Option(40, help="The first N tasks of the split."),
    env_url: str = typer.Option(None, help="An env service to use; default: start one."),
) -> None:
    """Is the teacher a good supervisor for this student? In the student's own greedy
    episodes, how often the teacher (and the student) would take the expert's action,
    in fresh states and right after a failed action."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.diagnostics import expert_agreement
    from trainer.models import AgentSpec
    from trainer.prepare import env_service

    agent = AgentSpec.read(student) or AgentSpec()
    tokenizer = AutoTokenizer.from_pretrained(student)
    models = {
        f"{name} ({Path(path).name})": AutoModelForCausalLM.from_pretrained(path).eval()
        for name, path in (("student", student), ("teacher", teacher))
    }
    with env_service(env_url) as url:
        agreements = asyncio.run(
            expert_agreement(
                next(iter(models.values())),  # the student plays
                models,
                agent.renderer(tokenizer),
                url,
                split,
                list(range(limit)),
                agent,
            )
        )
    typer.echo(f"in the student's greedy episodes on the first {limit} {split} tasks:")
    for agreement in agreements:
        typer.echo(f"  {agreement.line()}")


def log_to_stderr() -> None:
    """The trainer's and clients' own messages (a resume, a retry, a dropped episode) on
    stderr, with the time; libraries' request logs stay quiet."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in ("trainer", "client"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False


@app.command("train")
def train_command(
    config: str = typer.Option(..., help="YAML TrainConfig (configs/train-*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set loss.alpha=0.3"),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a student by OPD or SAGE-OPD against running env and teacher services.

    Resumes from the newest checkpoint in the run's out_dir when there is one. Under
    `torchrun --nproc-per-node N --no-python sage-opd train ...` the student trains on
    N data-parallel ranks (trainer/distributed.py).
    """
    from trainer.config import TrainConfig, load_config
    from trainer.supervision import CrossTokenizerDivergence
    from trainer.train import EpisodesLost, train

    settings = load_config(TrainConfig, config, set_)
    log_to_stderr()
    try:
        rows = train(settings, progress=not quiet)
    except CrossTokenizerDivergence as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(3) from exc
    except EpisodesLost as exc:
        typer.echo(f"stopped: {exc}", err=True)
        raise typer.Exit(1) from exc
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        typer.echo(_result_lines(rows))


def _result_lines(rows: list[dict]) -> str:
    """Success before (step 0) and after (the last evaluation) on each evaluated split."""
    evaluated = [row for row in rows if any(k.startswith("eval_") for k in row)]
    if not evaluated:
        return "no evaluation ran"
    lines = []
    first, last = evaluated[0], evaluated[-1]
    for key in sorted(k for k in last if k.startswith("eval_") and k.endswith("_success")):
        split = key[len("eval_") : -len("_success")]
        before = f"{first[key]:.1%} (step {first['step']})" if key in first else "n/a"
        lines.append(f"{split}: success {before} -> {last[key]:.1%} (step {last['step']})")
    return "\n".join(lines)


@app.command("experiment")
def experiment_command(
    grid: str = typer.Option(..., help="YAML grid (configs/grid-*.yaml): methods x seeds."),
    out: str = typer.Option("runs/grid", help="Runs go to OUT/<method>/seed-<n>."),
    artifacts: str = typer.Option("artifacts", help="Where prepared models are cached."),
    quiet: bool = typer.Option(False, help="No progress display."),
) -> None:
    """Run a comparison grid side by side against one env and one teacher service.

    Finished runs (a done.json in their folder) are not run again; interrupted ones
    resume from their newest checkpoint. Then: sage-opd report OUT.
    """
    from pathlib import Path

    from trainer.experiment import run_grid

    log_to_stderr()
    start = time.perf_counter()
    failures = run_grid(grid, Path(out), Path(artifacts), progress=not quiet)
    typer.echo(f"grid done in {(time.perf_counter() - start) / 60:.1f} min: {out}")
    for failure in failures:
        typer.echo(f"failed: {failure}", err=True)
    if failures:
        raise typer.Exit(1)


@app.command("report")
def report_command(
    run_dirs: list[str] = typer.Argument(
        ..., help="Run folders, folders above runs, or a report's runs.jsonl."
    ),
    out: str = typer.Option("results/report", help="Writes table.md, PNG plots, runs.jsonl."),
) -> None:
    """The comparison's markdown table (mean ± std over seeds) and success plots."""
    from pathlib import Path

    from trainer.report import write_report

    try:
        path = write_report([Path(p) for p in run_dirs], Path(out))
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(path.read_text())
    typer.echo(f"written: {path.parent}")


@app.command("up")
def up(
    teacher: str = typer.Option(None, help="Model folder or HF id for the teacher service."),
    env_port: int = typer.Option(8100),
    teacher_port: int = typer.Option(8200),
) -> None:
    """Start the env service (and a teacher service) on loopback; stop them on Ctrl-C."""
    import signal

    from trainer.stack import local_stack

    # Ctrl-C stops us even when the process that started us ignored SIGINT (an ignored
    # signal is inherited across exec; some JVM launchers ignore it in their parent).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a blocked mask is inherited too
    with local_stack(teacher, env_port, teacher_port) as services:
        for name, service in services.items():
            typer.echo(f"{name} service ready at {service.url}")
        typer.echo("Ctrl-C stops them.")
        try:
            while all(s.process.poll() is None for s in services.values()):
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        stopped = [s.name for s in services.values() if s.process.poll() is not None]
        if stopped:
            typer.echo(f"service exited: {', '.join(stopped)}", err=True)


@app.command("demo")
def demo(
    models: str = typer.Option(
        "models/tiny", help="A folder with teacher/ and student-init/ (prepare --export)."
    ),
    train_config: str = typer.Option("configs/train-demo.yaml", help="The SAGE-OPD run."),
    set_: list[str] = typer.Option([], "--set", help="Override a train field."),
    out: str = typer.Option("runs/demo", help="Runs go to OUT/<time>."),
) -> None:
    """The local stack on loopback and a short SAGE-OPD run; success before and after.

    Starts the env service and a teacher service serving MODELS/teacher, measures the
    teacher for reference, trains MODELS/student-init and prints its success on the
    config's eval split before and after.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import TrainConfig, load_config
    from trainer.evaluate import summarize
    from trainer.prepare import MODEL_FOLDERS
    from trainer.stack import local_stack
    from trainer.train import play_split, train

    start = time.perf_counter()
    folder = Path(models)
    missing = [name for name in MODEL_FOLDERS if not (folder / name / "config.json").exists()]
    if missing:
        raise typer.BadParameter(
            f"{folder} lacks {', '.join(missing)}: make them with `sage-opd prepare --config "
            f"configs/prepare-tiny.yaml --export {folder}`",
            param_hint="--models",
        )
    run_dir = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    with local_stack(teacher=str(folder / "teacher")) as services:
        env_url, teacher_url = services["env"].url, services["teacher"].url
        typer.echo(f"env service at {env_url}, teacher service at {teacher_url}")
        overrides = [
            f"student={folder / 'student-init'}",
            f"teacher_urls=[{teacher_url}]",
            f"env_url={env_url}",
            f"out_dir={run_dir}",
            *set_,
        ]
        config = load_config(TrainConfig, train_config, overrides)
        teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "teacher")
        for split in config.eval_splits:
            episodes = asyncio.run(play_split(teacher, tokenizer, env_url, split, config))
            typer.echo(f"teacher, for reference: {summarize(split, episodes).line()}")
        rows = train(config)
    typer.echo(f"SAGE-OPD student, before -> after ({run_dir}):")
    typer.echo(_result_lines(rows))
    typer.echo(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    app()
