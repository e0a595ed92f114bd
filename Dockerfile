# md5-light: the API and the workers in one image. Runtime dependencies only.
# BASE_IMAGE is any Debian-like image with Python 3.11+ and its venv module:
# python:3.11-slim for users; `make test-image` passes a Debian bookworm
# made locally by debootstrap (no registry is reachable there).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data

# The service's own user owns only /data (the embedded database's files go
# to /data/db; the database container of the compose layout uses it too).
# The code and the venv belong to root: the service cannot change them.
RUN useradd --create-home --uid 10001 md5 \
    && mkdir -p /data/db && chown -R md5:md5 /data

# A venv: the same `python` and the same site-packages on every base (Debian's
# own python3 is "externally managed", PEP 668, and has no `python` command).
# pip and setuptools leave with the layer that used them.
WORKDIR /app
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r requirements.txt \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools
COPY run.py openapi.yaml ./
COPY service ./service
COPY handlers ./handlers

USER md5
EXPOSE 8000
VOLUME ["/data"]

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]

# With MONGODB_URI unset this starts the embedded database in /data too.
CMD ["python", "run.py"]
