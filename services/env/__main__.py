"""`python -m services.env [--host H] [--port P]`: run the env service under uvicorn.

Other settings come from SAGE_ENV_* environment variables (services/env/settings.py).
"""

from __future__ import annotations

import argparse

from services.env.settings import EnvSettings


def main(argv: list[str] | None = None) -> None:
    defaults = EnvSettings()
    parser = argparse.ArgumentParser(prog="python -m services.env", description=__doc__)
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--environments", default=defaults.environments)
    args = parser.parse_args(argv)
    serve_env(args.host, args.port, args.environments)


def serve_env(host: str, port: int, environments: str | None = None) -> None:
    from services.env.app import create_app
    from services.http import serve

    overrides = {"host": host, "port": port}
    if environments:
        overrides["environments"] = environments
    settings = EnvSettings(**overrides)
    serve(create_app(settings), settings.host, settings.port, settings.log_level)


if __name__ == "__main__":
    main()
