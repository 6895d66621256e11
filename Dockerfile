# syntax=docker/dockerfile:1.7
# The iotad image: `iotad` is the entrypoint (default command: `worker`), and the default model
# (models/default) ships inside the installed package, so the image scores out of the box.
#
#   CPU (default):  docker build -t iotad:0.1.0 .
#   CUDA:           docker build -t iotad:0.1.0-cuda \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The CUDA variant is the same Dockerfile with another PyTorch wheel index: CUDA builds of torch
# carry the CUDA runtime as nvidia-* wheels, so the slim Python base serves both; the host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit (Kubernetes: the NVIDIA device plugin).
# Pick the index (cu126, cu128, cu130, ...) that the torch release provides and the nodes' driver supports
# (cu128 needs an NVIDIA driver >= 570, cu130 >= 580).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extras of the iotad package: s3 = s3fs, for a model registry on s3:// (IOTAD_REGISTRY_URL, as in
# k8s/overlays/prod). --build-arg IOTAD_EXTRAS= builds without any.
ARG IOTAD_EXTRAS=s3
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index: a plain `pip install torch` would pull the multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY models ./models
# A regular (not editable) install: the model artifact is package data (models/default/*).
RUN pip install ".${IOTAD_EXTRAS:+[${IOTAD_EXTRAS}]}" \
 && cd / \
 && python -c "from pipeline.settings import DEFAULT_MODEL_DIR as d; assert (d / 'model.json').is_file(), d" \
 && iotad --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="iotad" \
      org.opencontainers.image.description="Streaming anomaly detection for IoT sensor fleets" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 iotad \
 && useradd --system --uid 10001 --gid iotad --home-dir /var/lib/iotad --shell /usr/sbin/nologin iotad \
 && install -d -o iotad -g iotad -m 0750 /var/lib/iotad
COPY --from=build /opt/venv /opt/venv
# Writable places (a read-only root filesystem mounts tmpfs/emptyDir here): the working directory
# holds Faust's data dir; matplotlib and other caches go to /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/iotad \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    IOTAD_METRICS_HOST=0.0.0.0 \
    IOTAD_METRICS_PORT=9464
WORKDIR /var/lib/iotad
USER 10001:10001
EXPOSE 9464
# No HEALTHCHECK here: only `iotad worker` (9464) and `iotad alerter` (9465) serve /metrics; docker-compose.yml
# and k8s/ probe them.
ENTRYPOINT ["iotad"]
CMD ["worker"]
