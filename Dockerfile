FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY outbox outbox
COPY sagas sagas
COPY consumers consumers
COPY producers producers
COPY infra infra
RUN pip install --no-cache-dir .
ENV COMPENSA_LOG_FORMAT=json
ENTRYPOINT ["compensa"]
