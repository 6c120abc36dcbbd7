# One image for every compensa service (compose.yaml builds it once, as compensa:local).
# Two stages: `build` installs the project and its runtime dependencies (no dev extras)
# into a virtualenv; `runtime` copies only that virtualenv and runs as an unprivileged user.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/compensa
ENV PATH=/opt/compensa/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY outbox outbox
COPY sagas sagas
COPY consumers consumers
COPY producers producers
COPY infra infra
# A regular (not editable) install: the packages land in the virtualenv, the sources stay here.
RUN pip install . && compensa --help >/dev/null

FROM python:3.11-slim AS runtime
# A fixed uid/gid, so volume permissions do not depend on the build machine.
RUN groupadd --system --gid 10001 compensa \
    && useradd --system --uid 10001 --gid compensa --home-dir /app --no-create-home --shell /usr/sbin/nologin compensa \
    && mkdir -p /app \
    && chown compensa:compensa /app
COPY --from=build /opt/compensa /opt/compensa
ENV PATH=/opt/compensa/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COMPENSA_LOG_FORMAT=json
WORKDIR /app
USER compensa:compensa
# A long-running service with COMPENSA_METRICS_PORT serves /metrics: healthy while it answers.
# Without it (migrate, the cli) there is nothing to probe and the check passes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('COMPENSA_METRICS_PORT'); port and urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=4)"]
ENTRYPOINT ["compensa"]
CMD ["--help"]
