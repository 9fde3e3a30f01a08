# MLflow tracking server: PostgreSQL backend store, S3-compatible artifact store, artifacts
# proxied by the server (--serve-artifacts), so Ray workers need only the HTTP tracking URI.
#
#   docker build -f deploy/docker/mlflow.Dockerfile -t REGISTRY/noisyseg-mlflow:3.17.2 .
#
# Configuration (all at run time, nothing baked in; see deploy/docker/mlflow-entrypoint.sh):
#   MLFLOW_BACKEND_STORE_URI       postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB (from a Secret)
#   MLFLOW_ARTIFACTS_DESTINATION   s3://BUCKET/mlflow-artifacts
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (Secret), AWS_DEFAULT_REGION,
#   MLFLOW_S3_ENDPOINT_URL         for MinIO / other S3-compatible stores
#   MLFLOW_HOST (default 0.0.0.0: inside a pod; use 127.0.0.1 elsewhere), MLFLOW_PORT (5000),
#   MLFLOW_ALLOWED_HOSTS           Host headers accepted, e.g. mlflow,mlflow.noisyseg.svc:5000
#   MLFLOW_WORKERS                 server worker processes (default 2)
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_WORKERS=2

RUN pip install --no-cache-dir \
        "mlflow==3.17.2" \
        "psycopg2-binary==2.9.13" \
        "boto3==1.43.117"

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow
COPY --chmod=0755 deploy/docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MLFLOW_PORT', '5000'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
