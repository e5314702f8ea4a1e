# syntax=docker/dockerfile:1
#
# Production image for Infusion Bridge.
#
#   docker build -t infusion-bridge:latest .
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql+psycopg://... infusion-bridge:latest
#
# Two stages: the first builds a wheel of the project (and of every runtime
# dependency), the second installs only those wheels into a clean slim image.
# No compiler, no build tooling and no dev extras end up in the runtime stage.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Only what the package build needs; tests, docs and local state stay out
# (see also .dockerignore).
COPY pyproject.toml README.md ./
COPY service ./service
COPY mappings ./mappings

# `pip wheel .` resolves the runtime dependencies only: the `dev` extra is
# never requested, so pytest/ruff/mypy are not built or shipped.
RUN pip wheel --wheel-dir /wheels .

# ------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PROFILES_DIR=/app/profiles \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged system user; the service never needs root at runtime.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app

# --no-index: install strictly from the wheels built above, never from PyPI.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels infusion-bridge

WORKDIR /app

# profiles/ is not a Python package, so it is not inside the wheel; ship it
# next to the working directory. var/ is where the default SQLite database
# (sqlite:///./var/infusion-bridge.db) lives when DATABASE_URL is unset, so it
# must be writable by the app user.
COPY --chown=app:app profiles ./profiles
RUN mkdir -p /app/var && chown app:app /app/var

USER app

EXPOSE 8000

# /healthz only says "the process is up"; readiness (database + migrations)
# is /readyz and is left to the orchestrator. python:3.11-slim has no curl,
# so the probe uses the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# 0.0.0.0 (not the CLI default 127.0.0.1) so the published port is reachable
# from outside the container's network namespace.
CMD ["infusion-bridge", "serve", "--host", "0.0.0.0", "--port", "8000"]
