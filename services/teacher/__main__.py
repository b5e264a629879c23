"""`python -m services.teacher --model PATH_OR_ID [--host H] [--port P]`: run the teacher service.

Settings come from SAGE_TEACHER_* environment variables (services/teacher/settings.py);
a flag given overrides its variable.
"""

from __future__ import annotations

import argparse

from services.teacher.settings import TeacherSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.teacher", description=__doc__)
    parser.add_argument("--model", help="HF id, local folder, or GGUF folder")
    parser.add_argument("--model-name")
    parser.add_argument("--gguf-file")
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--backend", choices=["transformers", "vllm"])
    parser.add_argument("--host", help="bind address (default loopback)")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    serve_teacher(**vars(args))


def serve_teacher(**overrides: object) -> None:
    """Serve the teacher app; each override that is not None replaces its
    SAGE_TEACHER_* setting."""
    from services.http import serve
    from services.teacher.app import create_app

    settings = TeacherSettings(**{k: v for k, v in overrides.items() if v is not None})
    serve(create_app(settings), settings.host, settings.port, settings.log_level)


if __name__ == "__main__":
    main()
