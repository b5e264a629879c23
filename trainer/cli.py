"""`sage-opd`: one command line for every component (services, baselines, demo).

Each sub-command imports what it needs when it runs, so `sage-opd --help` is quick
and serving the env service never imports torch.
"""

from __future__ import annotations

import asyncio
import time

import typer

from client.protocol import Split

app = typer.Typer(help="SAGE-OPD: multi-turn on-policy distillation for LLM agents.")
env_app = typer.Typer(help="The environment service.")
teacher_app = typer.Typer(help="The teacher service.")
app.add_typer(env_app, name="env")
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("serve")
def teacher_serve(
    model: str = typer.Option(
        None, help="HF id, local model folder, or the folder of a GGUF file."
    ),
    model_name: str = typer.Option("teacher", help="The name answers carry."),
    gguf_file: str = typer.Option(None, help="GGUF file name inside --model."),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("auto", help="auto: CUDA when present, else CPU."),
    backend: str = typer.Option("transformers", help="transformers or vllm"),
    host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless you mean it."),
    port: int = typer.Option(8200),
) -> None:
    """Run the teacher service (settings also from SAGE_TEACHER_* variables)."""
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
    host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless you mean it."),
    port: int = typer.Option(8100),
    environments: str = typer.Option("household", help="Comma-separated environments to serve."),
) -> None:
    """Run the env service under uvicorn (settings also from SAGE_ENV_* variables)."""
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
        listing = await client.environments()
        sizes = {e.name: e.splits for e in listing.environments}
        if env not in sizes or split not in sizes[env]:
            raise typer.BadParameter(f"{url} serves {sizes}; no {env}/{split}")
        count = sizes[env][split] if limit <= 0 else min(limit, sizes[env][split])
        episodes = await play_split(client, policy, split, list(range(count)), env, concurrency)  # type: ignore[arg-type]
    return success_rate(episodes), len(episodes)


@app.command("demo")
def demo(
    split: str = typer.Option("valid_unseen"),
) -> None:
    """Bring the local stack up on loopback and show the reference policies' success."""
    from trainer.stack import local_stack

    start = time.perf_counter()
    with local_stack() as services:
        url = services["env"].url
        typer.echo(f"env service ready at {url}")
        results = {}
        for policy in ("expert", "random"):
            results[policy] = asyncio.run(_play(url, policy, split, "household", 0, 16))  # type: ignore[arg-type]
    for policy, (rate, count) in results.items():
        typer.echo(f"{policy:>6} policy on household/{split}: success {rate:6.1%} ({count} tasks)")
    typer.echo(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    app()
