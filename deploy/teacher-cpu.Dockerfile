# The teacher service on CPU: transformers backend, PyTorch's CPU build.
# From the repository root: docker build -f deploy/teacher-cpu.Dockerfile -t sage-opd-teacher-cpu .
# Models: mount them (the compose file's `models` volume, the k8s PVC) and point
# SAGE_TEACHER_MODEL at one; the project's tiny models ship in the image at /models/tiny.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
# Where pip finds the CPU build of torch (PyPI's default build carries CUDA: several GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Settings and metadata first, the project's files and installs last (.dockerignore
# says which files): the fewest layers above the large ones.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 \
    SAGE_TEACHER_HOST=0.0.0.0 SAGE_TEACHER_PORT=8200 \
    SAGE_TEACHER_MODEL=/models/tiny/teacher SAGE_TEACHER_ALLOWED_ROOTS='["/models"]'
EXPOSE 8200
HEALTHCHECK --interval=5s --timeout=5s --start-period=120s --retries=6 \
    CMD ["python", "-m", "services.probe", "teacher"]
CMD ["python", "-m", "services.teacher"]
WORKDIR /app

# torch in a layer of its own, which a change of the project's files leaves cached.
RUN python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sage \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY . ./
RUN pip install --no-cache-dir "/app[teacher]" \
    && mkdir -p /models && mv /app/models/tiny /models/tiny && chmod -R a+rX /models
USER 10001
