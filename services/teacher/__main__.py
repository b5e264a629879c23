"""`python -m services.teacher --model PATH_OR_ID [--host H] [--port P]`: run the teacher service.

Other settings come from SAGE_TEACHER_* environment variables (services/teacher/settings.py).
"""

from __future__ import annotations

import argparse

from services.teacher.settings import TeacherSettings


def main(argv: list[str] | None = None) -> None:
    defaults = TeacherSettings()
    parser = argparse.ArgumentParser(prog="python -m services.teacher", description=__doc__)
    parser.add_argument(
        "--model", default=defaults.model, help="HF id, local folder, or GGUF folder"
    )
    parser.add_argument("--model-name", default=defaults.model_name)
    parser.add_argument("--gguf-file", default=defaults.gguf_file)
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--backend", default=defaults.backend, choices=["transformers", "vllm"])
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=defaults.port)
    args = parser.parse_args(argv)
    serve_teacher(**vars(args))


def serve_teacher(**overrides: object) -> None:
    from services.http import serve
    from services.teacher.app import create_app

    settings = TeacherSettings(**{k: v for k, v in overrides.items() if v is not None})
    serve(create_app(settings), settings.host, settings.port, settings.log_level)


if __name__ == "__main__":
    main()
