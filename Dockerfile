# The flowbus image: the `flowbus` command with the sample app (workers.sample).
# compose.yaml builds it; your own services can start FROM it and add their module.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bus ./bus
COPY flows ./flows
COPY workers ./workers
RUN pip install . && useradd --create-home --uid 10001 flowbus

USER flowbus
# SIGTERM drains a worker; a second SIGTERM stops it at once.
STOPSIGNAL SIGTERM
CMD ["flowbus", "--help"]
