# fhir-server: slim Python base, non-root user, gunicorn (through `fhir-server serve`), health check.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY fhir_server ./fhir_server
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir -c requirements.lock --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FHIR_DATA_DIR=/var/lib/fhir-server \
    FHIR_HOST=0.0.0.0 \
    FHIR_PORT=8080
RUN groupadd --system fhir && useradd --system --gid fhir --home-dir /var/lib/fhir-server --shell /usr/sbin/nologin fhir \
 && mkdir -p /var/lib/fhir-server && chown fhir:fhir /var/lib/fhir-server && chmod 0700 /var/lib/fhir-server
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER fhir
WORKDIR /var/lib/fhir-server
VOLUME ["/var/lib/fhir-server"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request, sys; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"FHIR_PORT\", \"8080\")}/healthz', timeout=4).status == 200 else 1)"]
# Migrations first (idempotent), then gunicorn on all addresses. For production set FHIR_ENV=production,
# mount a master key file (FHIR_MASTER_KEY_FILE), and either mount a certificate (FHIR_TLS_CERT,
# FHIR_TLS_KEY) or name the TLS-terminating proxy in front (FHIR_TRUSTED_PROXY).
ENTRYPOINT ["sh", "-c", "fhir-server migrate && exec fhir-server serve \"$@\"", "fhir-server"]
