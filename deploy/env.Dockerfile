# The env service: the client contract and the env service in a virtual environment, no torch.
# From the repository root: docker build -f deploy/env.Dockerfile -t sage-opd-env .
# BASE_IMAGE: any Debian-like image with Python 3.11+ and its venv module.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Optional pip settings for a build behind a private index or CA (unset by default).
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL

# Settings and metadata first, the project's files and installs last (.dockerignore
# says which files): the fewest layers above the large ones.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SAGE_ENV_HOST=0.0.0.0 SAGE_ENV_PORT=8100
EXPOSE 8100
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=6 \
    CMD ["python", "-m", "services.probe", "env"]
CMD ["python", "-m", "services.env"]
WORKDIR /app

COPY . ./
RUN python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sage \
    && pip install --no-cache-dir "/app[env]" && rm -rf /app/models
USER 10001
