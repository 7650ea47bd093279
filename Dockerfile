# syntax=docker/dockerfile:1
# taskstream: a small image whose entry point is the `taskstream` command line.
#
#   docker build -t taskstream:0.1.0 .                            RabbitMQ, SQS and Azure clients (default)
#   docker build --build-arg EXTRAS=rabbitmq -t taskstream:rmq .  only what RabbitMQ needs
#   docker build --build-arg EXTRAS= -t taskstream:core .         the embedded memory broker only
#   docker run --rm -e TASKSTREAM_BROKER_URL=amqp://guest:guest@host:5672/ taskstream:0.1.0 worker examples.endpoint:app
#
# Configuration comes only from TASKSTREAM_* environment variables (see docs/deploy.md); the process runs as the
# non-root user 10001 in /var/lib/taskstream (its working directory, the one writable place), with the
# application code in /app on PYTHONPATH. SIGTERM stops it cleanly: in-flight work finishes or returns to the queue.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=rabbitmq,sqs,azure
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/taskstream/venv \
 && /opt/taskstream/venv/bin/pip install --quiet --upgrade pip \
 && /opt/taskstream/venv/bin/pip install --quiet ".${EXTRAS:+[$EXTRAS]}" \
 && /opt/taskstream/venv/bin/taskstream version

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="taskstream" \
      org.opencontainers.image.description="Python functions as async consumers over pluggable message brokers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 taskstream \
 && useradd --system --uid 10001 --gid taskstream --home-dir /var/lib/taskstream --create-home \
      --shell /usr/sbin/nologin taskstream
COPY --from=build /opt/taskstream/venv /opt/taskstream/venv
COPY examples /app/examples
ENV PATH=/opt/taskstream/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/taskstream
USER 10001:10001
# The health server of `taskstream run` / `taskstream worker` when TASKSTREAM_HEALTH_PORT=8080.
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["taskstream"]
CMD ["--help"]
