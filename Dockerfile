# One image for every part of the gateway: web, worker, beat, hl7listener, dicomserver.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_DATA_DIR=/data \
    TCP_NODELAY=1

RUN useradd --create-home --uid 1000 gateway \
    && mkdir -p /data /app \
    && chown gateway:gateway /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY worklist ./worklist
COPY routing ./routing
COPY templates ./templates
COPY manage.py ./
# Static files are served by WhiteNoise straight from the apps (no collectstatic step, so the
# image holds no secret and no data).
RUN pip install --no-cache-dir .

USER gateway
VOLUME ["/data"]
EXPOSE 8000 2575 11112
CMD ["gunicorn", "gateway.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3", "--config", "python:gateway.gunicorn_config"]
