"""`make compose-test`: the docker-compose stack built and run for real, with a teacher swap.

Phases, each timed: a Docker engine (Debian's docker.io and docker-compose, started
as `dockerd --iptables=false --storage-driver=vfs` when none runs and this is root);
a local base image (debootstrap of Debian bookworm, which has Python 3.11, loaded
with `docker import`; for machines that reach no image registry); the images built
by `docker-compose build` against that base; `docker-compose up` until env and
teacher are healthy; the demo's training in the trainer container, during which the
teacher is swapped through its admin API; the run's metrics checked for both teacher
revisions; `docker-compose down -v`.

This machine's pip settings reach the builds only from here, as build arguments:
the CA bundle (PIP_CERT) and local wheels (PIP_FIND_LINKS: PyTorch's CPU build),
both copied into the base image, and builds use the host's network.

    python deploy/compose_test.py [--steps N] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "sage-opd-base:bookworm"
PROJECT = "sage-opd-compose-test"
PACKAGES = {"docker": "docker.io", "dockerd": "docker.io", "docker-compose": "docker-compose"}
MIRROR = "http://deb.debian.org/debian"
RUN = "compose-test"

phases: list[tuple[str, float]] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        yield
    finally:
        phases.append((name, time.monotonic() - start))
        print(f"   {name}: {phases[-1][1]:.1f}s", flush=True)


def sh(*command: str, env: dict[str, str] | None = None, **kwargs: object) -> str:
    """Run a command; its output returned, a failure raised with what it printed."""
    done = subprocess.run(
        command, env={**os.environ, **(env or {})}, capture_output=True, text=True, **kwargs
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}"
            f"{done.stderr[-4000:]}"
        )
    return done.stdout


def engine() -> None:
    """Docker's client, daemon and compose, and debootstrap; the daemon running."""
    wanted = dict(PACKAGES, debootstrap="debootstrap")
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"install {' '.join(missing)} (as root) first")
        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-qq", env=apt)
        sh("apt-get", "install", "-y", "-qq", *missing, env=apt)
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        raise SystemExit("no Docker daemon runs and only root can start one here")
    log = open(Path(tempfile.gettempdir()) / "sage-opd-dockerd.log", "ab")
    subprocess.Popen(
        ["dockerd", "--iptables=false", "--storage-driver=vfs"],
        stdout=log,
        stderr=log,
        start_new_session=True,  # the daemon outlives this script, as a system service would
    )
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not start in 60 s; see {log.name}")
        time.sleep(1)


def host_pip() -> dict[str, str]:
    """What pip on this machine needs that a fresh image lacks: its CA bundle (pip's
    `cert`, else the system's) and the wheels it finds locally (PyTorch's CPU build),
    read from pip's environment variables or its configuration files."""
    settings = dict(os.environ.items())
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for line in listed.splitlines():  # global.cert='/etc/ssl/...'
        key, _, value = line.partition("=")
        name = "PIP_" + key.rsplit(".", 1)[-1].upper().replace("-", "_")
        settings.setdefault(name, value.strip("'\""))
    found = {}
    for cert in (settings.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if cert and Path(cert).is_file():
            found["cert"] = cert
            break
    links = [p for p in settings.get("PIP_FIND_LINKS", "").split() if Path(p).is_dir()]
    torch = [w for d in links for w in glob.glob(f"{d}/torch-2.13.0*cp311*.whl")]
    if torch:
        found["torch"] = torch[0]
    return found


def base_image(pip: dict[str, str]) -> None:
    """Debian bookworm with python3 and its venv, imported as BASE_IMAGE (once)."""
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode:
        with tempfile.TemporaryDirectory(prefix="sage-opd-rootfs-") as folder:
            rootfs = Path(folder) / "rootfs"
            sh(
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                MIRROR,
            )
            if "cert" in pip:
                shutil.copy(pip["cert"], rootfs / "etc/ssl/certs/host-ca-bundle.crt")
            if "torch" in pip:
                (rootfs / "opt/wheels").mkdir(parents=True)
                shutil.copy(pip["torch"], rootfs / "opt/wheels")
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(rootfs / cache, ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            sh("docker", "import", "-", BASE_IMAGE, stdin=tar.stdout)
            if tar.wait() != 0:
                raise RuntimeError("tar of the base image's root failed")
    print(f"   {BASE_IMAGE}: {image_size(BASE_IMAGE)}", flush=True)


def image_size(name: str) -> str:
    size = int(sh("docker", "image", "inspect", "--format", "{{.Size}}", name).strip())
    return f"{size / 1e6:.0f} MB"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose(*args: str, env: dict[str, str], **kwargs: object) -> str:
    return sh("docker-compose", "-p", PROJECT, *args, env=env, cwd=ROOT, **kwargs)


def wait_healthy(services: list[str], env: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    containers = {name: compose("ps", "-q", name, env=env).strip() for name in services}
    while True:
        states = {
            name: sh("docker", "inspect", "--format", "{{.State.Health.Status}}", c).strip()
            for name, c in containers.items()
        }
        if all(state == "healthy" for state in states.values()):
            return
        if time.monotonic() > deadline or "unhealthy" in states.values():
            logs = {name: compose("logs", "--tail", "15", name, env=env) for name in services}
            raise RuntimeError(f"not healthy after {timeout_s:.0f}s: {states}\n{logs}")
        time.sleep(2)


def volume_path(name: str) -> Path:
    return Path(sh("docker", "volume", "inspect", "--format", "{{.Mountpoint}}", name).strip())


def read_rows(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]


def admin_load(port: int, token: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/load",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def train_with_swap(env: dict[str, str], token: str, steps: int) -> list[dict]:
    """The demo's training in the trainer container; after its first step the teacher
    is swapped to another model (the tiny student's initial weights) under load."""
    command = [
        "docker-compose", "-p", PROJECT, "--profile", "train", "run", "--rm", "trainer",
        "train", "--config", "configs/train-demo.yaml", "--quiet",
        "--set", "student=/models/tiny/student-init",
        "--set", "teacher_urls=[http://teacher:8200]",
        "--set", "env_url=http://env:8100",
        "--set", f"out_dir=/runs/{RUN}",
        "--set", f"steps={steps}",
    ]  # fmt: skip
    log = Path(tempfile.gettempdir()) / "sage-opd-compose-trainer.log"
    with open(log, "w") as out:
        trainer = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
        metrics = volume_path(f"{PROJECT}_runs") / RUN / "metrics.jsonl"
        swapped = None
        while trainer.poll() is None:
            if swapped is None and any(row["step"] >= 1 for row in read_rows(metrics)):
                swapped = admin_load(
                    int(env["TEACHER_PORT"]),
                    token,
                    {"name": "teacher-b", "source": "/models/tiny/student-init", "activate": True},
                )
                print(f"   swapped the teacher to {swapped['name']}", flush=True)
            time.sleep(1)
    printed = [line for line in log.read_text().splitlines() if line and "it/s]" not in line]
    print("   trainer:", *printed[-2:], sep="\n   | ", flush=True)
    if trainer.returncode != 0:
        raise RuntimeError(f"the trainer exited {trainer.returncode}; its output: {log}")
    if swapped is None:
        raise RuntimeError("the run ended before a step was logged: no swap happened")
    return read_rows(metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps (demo: 30)")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    args = parser.parse_args(argv)
    started = time.monotonic()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="sage-opd-compose-") as folder:
        admin_env = Path(folder) / "compose.env"
        admin_env.write_text(f"SAGE_TEACHER_ADMIN_TOKEN={token}\n")
        with phase("engine"):
            engine()
        pip = host_pip()
        env = {
            "BASE_IMAGE": BASE_IMAGE,
            "BUILD_NETWORK": "host",  # dockerd runs without iptables: no NAT for bridges
            "ADMIN_ENV_FILE": str(admin_env),
            "ENV_PORT": str(free_port()),
            "TEACHER_PORT": str(free_port()),
        }
        if "cert" in pip:
            env["BUILD_PIP_CERT"] = "/etc/ssl/certs/host-ca-bundle.crt"
        if "torch" in pip:
            env["BUILD_PIP_FIND_LINKS"] = "/opt/wheels"
            env["TORCH_INDEX_URL"] = "https://pypi.org/simple"  # the CPU wheel is local
        with phase("base image"):
            base_image(pip)
        try:
            with phase("build"):
                compose("--profile", "train", "build", env=env)
                for image in ("env", "teacher-cpu", "trainer"):
                    print(f"   sage-opd-{image}: {image_size(f'sage-opd-{image}:latest')}")
            with phase("up until healthy"):
                compose("up", "-d", "env", "teacher", env=env)
                wait_healthy(["env", "teacher"], env, timeout_s=300)
            with phase("train with a teacher swap"):
                rows = train_with_swap(env, token, args.steps)
            with phase("check"):
                revisions = sorted({r for row in rows for r in row.get("teacher_revisions", [])})
                models = sorted({row["teacher_model"] for row in rows if "teacher_model" in row})
                last = max(row["step"] for row in rows)
                print(f"   steps logged: {last} of {args.steps}; teacher models: {models}")
                print(f"   teacher revisions: {len(revisions)}")
                if last != args.steps or len(revisions) < 2 or models != ["teacher", "teacher-b"]:
                    raise RuntimeError("the run did not finish with both teachers' revisions")
        finally:
            if not args.keep:
                with phase("down"):
                    compose("--profile", "train", "down", "-v", "--remove-orphans", env=env)
    print("compose test phases:", ", ".join(f"{name} {s:.0f}s" for name, s in phases))
    print(f"compose test passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
