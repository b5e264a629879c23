# The trainer: `sage-opd` with the trainer's extra (torch, transformers) and the configs.
# From the repository root: docker build -f deploy/trainer.Dockerfile -t sage-opd-trainer .
# On a GPU: a CUDA BASE_IMAGE and TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128;
# several GPUs: `torchrun --nproc-per-node N --no-python sage-opd train ...` (README, Deploy).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Settings and metadata first, the project's files and installs last (.dockerignore
# says which files): the fewest layers above the large ones.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 MPLCONFIGDIR=/tmp/matplotlib
# A one-shot job, not a server: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["sage-opd"]
CMD ["--help"]
WORKDIR /app

# torch in a layer of its own, which a change of the project's files leaves cached.
RUN python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sage \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY . ./
# Runs go to /runs (a volume in the compose file, the k8s Job's), the user's to write.
RUN pip install --no-cache-dir "/app[trainer]" \
    && mkdir -p /models /runs && mv /app/models/tiny /models/tiny && chmod -R a+rX /models \
    && chown 10001 /runs
USER 10001
