# The env service's image: Python, the client contract and the env service, no torch.
# Build from the repository root: docker build -f deploy/env.Dockerfile -t sage-opd-env .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY client ./client
COPY services ./services
COPY trainer ./trainer
RUN pip install --no-cache-dir ".[env]"
ENV SAGE_ENV_HOST=0.0.0.0 SAGE_ENV_PORT=8100
EXPOSE 8100
USER nobody
HEALTHCHECK CMD python -c "import httpx; httpx.get('http://127.0.0.1:8100/readyz').raise_for_status()"
CMD ["python", "-m", "services.env"]
