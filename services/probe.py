"""`python -m services.probe env|teacher`: exit 0 when the service on this host is ready.

The containers' HEALTHCHECK: it asks http://127.0.0.1:PORT/readyz, the port read
from the same SAGE_ENV_* / SAGE_TEACHER_* settings the service itself reads.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def port_of(service: str) -> int:
    """The port the named service listens on, by its settings."""
    if service == "env":
        from services.env.settings import EnvSettings

        return EnvSettings().port
    if service == "teacher":
        from services.teacher.settings import TeacherSettings

        return TeacherSettings().port
    raise ValueError(f"unknown service {service!r}: env or teacher")


def ready(port: int, host: str = "127.0.0.1", timeout_s: float = 3.0) -> bool:
    """Whether GET /readyz on ``host:port`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=timeout_s) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.probe env|teacher", file=sys.stderr)
        return 2
    try:
        port = port_of(args[0])
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0 if ready(port) else 1


if __name__ == "__main__":
    sys.exit(main())
