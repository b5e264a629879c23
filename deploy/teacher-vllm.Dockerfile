# The teacher service on a GPU with the vLLM backend, on vLLM's own image (CUDA, torch, vllm).
# From the repository root:
#   docker build -f deploy/teacher-vllm.Dockerfile -t sage-opd-teacher-vllm .
# Run with a GPU: docker run --gpus all -v MODELS:/models -e SAGE_TEACHER_MODEL=/models/M ...
ARG BASE_IMAGE=vllm/vllm-openai:v0.10.2
FROM ${BASE_IMAGE}

ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HOME=/tmp/hf \
    SAGE_TEACHER_HOST=0.0.0.0 SAGE_TEACHER_PORT=8200 SAGE_TEACHER_BACKEND=vllm \
    SAGE_TEACHER_DTYPE=bfloat16 SAGE_TEACHER_ALLOWED_ROOTS='["/models"]'
EXPOSE 8200
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=6 \
    CMD ["python3", "-m", "services.probe", "teacher"]
ENTRYPOINT []
CMD ["python3", "-m", "services.teacher"]
WORKDIR /app

COPY . ./
# The image's torch, transformers and vllm satisfy the extra; pip keeps them.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sage \
    && python3 -m pip install --no-cache-dir "/app[teacher]" && rm -rf /app/models
USER 10001
