# mcdrop: the Monte Carlo dropout uncertainty service, CPU torch by default.
#
#   docker build -t mcdrop:0.1.0 -t mcdrop:latest .
#   docker run --rm -p 8000:8000 mcdrop:0.1.0          # then http://127.0.0.1:8000/dashboard
#
# Build arguments:
#   BASE_IMAGE      any image with python3 (>= 3.11) and its venv module; default the official
#                   slim image. Where no registry is reachable, a local one (tests/test_docker.py
#                   makes it with debootstrap of Debian bookworm + python3 + python3-venv).
#   TORCH_VARIANT   "cpu" (default), or a CUDA build of the PyTorch index such as "cu128"; run
#                   that image with a GPU and MCDROP_DEVICE=cuda (deploy/docker-compose.gpu.yml).
#   TORCH_INDEX_URL where torch comes from; default https://download.pytorch.org/whl/$TORCH_VARIANT.
#   PIP_INDEX_URL   where every other package comes from; default PyPI.
# Offline: put every wheel needed (torch, the dependencies, setuptools) in ./wheels (ignored by
# git); when that folder holds any wheel, pip installs from it alone and never asks an index.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# Dependencies only (torch first, from its own index), so source edits never reinstall them;
# torch's own C++ test programs (~150 MB) are dropped.
FROM base AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY pyproject.toml wheel[s] /build/
RUN python3 -m venv /opt/venv \
    && if ls /build/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build; fi \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/python -c "import tomllib; print(*tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /build/requirements.txt \
    && /opt/venv/bin/pip install --requirement /build/requirements.txt \
    && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && rm -rf "${site}/torch/test" "${site}"/torch/bin/test_* "${site}"/torch/bin/*Test

# The mcdrop package alone, staged under /staging exactly where it lands in the runtime image.
FROM base AS build
COPY --from=deps /build/ /wheels/
COPY pyproject.toml README.md /src/
COPY service/ /src/service/
COPY models/ /staging/models/
RUN python3 -m venv /opt/venv \
    && if ls /wheels/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && /opt/venv/bin/pip install --no-deps --no-compile --root /staging /src \
    && python3 -m compileall -q -s /staging -p / /staging/opt/venv

FROM base AS runtime
RUN groupadd --system --gid 10001 mcdrop \
    && useradd --system --uid 10001 --gid mcdrop --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mcdrop
# Settings before content: the legacy builder commits each instruction from a container, and on
# the vfs storage driver that copies the whole file system, so these run while it is still small.
# 0.0.0.0 so the published port reaches it; beyond loopback, repository control stays off until
# MCDROP_CONTROL_TOKEN is set (docs/security.md).
ENV PATH=/opt/venv/bin:$PATH \
    MCDROP_HOST=0.0.0.0 \
    MCDROP_PORT=8000 \
    MCDROP_MODEL_REPOSITORY=/models
USER 10001:10001
EXPOSE 8000
# mcdrop serve drains in-flight requests on SIGTERM, then exits 0; give it time (docker stop -t).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('MCDROP_PORT', '8000'), timeout=4)"]
# Exec form: mcdrop is PID 1 and gets SIGTERM itself (no shell in between).
ENTRYPOINT ["mcdrop"]
CMD ["serve"]
# Two layers: the large, rarely changing dependencies, then the package and shipped models.
COPY --from=deps /opt/venv/ /opt/venv/
COPY --from=build /staging/ /
