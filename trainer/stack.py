"""Start SAGE-OPD's services as local processes on loopback, wait until ready, stop them.

`sage-opd up` and `make demo` use this to bring the stack up without Docker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServiceProcess:
    name: str
    url: str
    process: subprocess.Popen


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``url``/readyz until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service at {url} exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the service at {url} was not ready after {timeout_s:.0f}s")


def stop_with_parent() -> None:  # runs in the child between fork and exec
    """On Linux, the service gets SIGTERM when the process that started it dies, even
    by SIGKILL, so a killed trainer or demo leaves no service behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def local_service(
    name: str,
    module: str,
    args: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
) -> Iterator[ServiceProcess]:
    """Run ``python -m module --host H --port P ...`` until the block exits."""
    port = port or free_port(host)
    command = [sys.executable, "-m", module, "--host", host, "--port", str(port), *(args or [])]
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, preexec_fn=stop_with_parent
    )
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, process, ready_timeout_s)
        yield ServiceProcess(name, url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def local_stack(
    teacher: str | None = None,
    env_port: int | None = None,
    teacher_port: int | None = None,
    host: str = "127.0.0.1",
    teacher_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, ServiceProcess]]:
    """The services a local run needs, by name: the env service, and a teacher serving
    ``teacher`` (a model folder or HF id) when one is given. ``teacher_args`` go to
    `python -m services.teacher` (e.g. --backend vllm); ``env`` to both processes."""
    with ExitStack() as stack:
        quiet = {"SAGE_ENV_LOG_LEVEL": "warning", "SAGE_TEACHER_LOG_LEVEL": "warning"}
        quiet.update(env or {})
        env = stack.enter_context(
            local_service("env", "services.env", host=host, port=env_port, env=quiet)
        )
        services = {"env": env}
        if teacher is not None:
            services["teacher"] = stack.enter_context(
                local_service(
                    "teacher",
                    "services.teacher",
                    ["--model", teacher, *(teacher_args or [])],
                    host=host,
                    port=teacher_port,
                    env=quiet,
                    ready_timeout_s=600.0,
                )
            )
        yield services
