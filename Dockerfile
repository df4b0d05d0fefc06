# Two stages: build a wheel of the project, then install it (with its dependencies from PyPI)
# into a slim runtime that runs as an unprivileged user.
#   docker build -t openai-model-rerouter .
#   docker run -d -p 1234:1234 -e UPSTREAM_URL=http://host.docker.internal:8000 openai-model-rerouter
# tests/test_dockerfile.py replays this file's pip commands, ENV, ENTRYPOINT and HEALTHCHECK in a
# fresh venv, so keep the pip steps plain `pip wheel`/`pip install` RUN lines.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="openai-model-rerouter" \
      org.opencontainers.image.description="Proxy for OpenAI-compatible APIs that rewrites the requested model id" \
      org.opencontainers.image.licenses="MIT"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rerouter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/openai_model_rerouter-*.whl

# UPSTREAM_URL has no default: pass it with `docker run -e UPSTREAM_URL=...` (without it the
# container exits 2 with "UPSTREAM_URL: required"). The metrics directory is wiped and recreated
# at start; /tmp stays writable under a read-only root file system with an emptyDir on /tmp.
# WORKERS=auto: one worker per CPU the container may use (its CPU set and its --cpus limit).
ENV LISTEN_HOST=0.0.0.0 \
    LISTEN_PORT=1234 \
    WORKERS=auto \
    MODEL_MAP="{}" \
    DISABLE_THINKING=false \
    PROMETHEUS_MULTIPROC_DIR=/tmp/rerouter-metrics

USER 10001:10001
EXPOSE 1234
# slim has no curl: probe /healthz with the standard library on the address the server listens on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; h = os.environ.get('LISTEN_HOST', '0.0.0.0'); h = {'0.0.0.0': '127.0.0.1', '': '127.0.0.1', '::': '::1'}.get(h, h); h = '[%s]' % h if ':' in h else h; r.urlopen('http://%s:%s/healthz' % (h, os.environ.get('LISTEN_PORT', '1234')), timeout=4)"]
# Exec form: the server is PID 1 and gets docker stop's SIGTERM itself. It drains for up to
# SHUTDOWN_GRACE + SHUTDOWN_TIMEOUT (5 + 30 s): give `docker stop -t 40` or `--stop-timeout 40`.
ENTRYPOINT ["openai-model-rerouter"]
