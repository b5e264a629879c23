"""`python -m services.env [--host H] [--port P]`: run the env service under uvicorn.

Settings come from SAGE_ENV_* environment variables (services/env/settings.py); a
flag given overrides its variable.
"""

from __future__ import annotations

import argparse

from services.env.settings import EnvSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.env", description=__doc__)
    parser.add_argument("--host", help="bind address (default loopback)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--environments", help="comma-separated names to serve")
    args = parser.parse_args(argv)
    serve_env(args.host, args.port, args.environments)


def serve_env(
    host: str | None = None, port: int | None = None, environments: str | None = None
) -> None:
    """Serve the env app; each argument given overrides its SAGE_ENV_* setting."""
    from services.env.app import create_app
    from services.http import serve

    given = {"host": host, "port": port, "environments": environments}
    settings = EnvSettings(**{k: v for k, v in given.items() if v is not None})
    serve(create_app(settings), settings.host, settings.port, settings.log_level)


if __name__ == "__main__":
    main()
