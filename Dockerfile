# syntax=docker/dockerfile:1
# One image for the proxy (the default command) and the mock providers (`payagg-mock ...`).
#
# The base image is pinned to an exact patch release, not to a digest: the tag was chosen offline.
# To pin the digest as well, and to refresh it later:
#   docker buildx imagetools inspect python:3.11.10-slim-bookworm --format '{{json .Manifest.Digest}}'
# then write `FROM python:3.11.10-slim-bookworm@sha256:<digest>` in both stages and rebuild; bump the
# tag and the digest together (3.11 is the Python the test suite runs on).

FROM python:3.11.10-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from: setuptools reads README.md as the long description.
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY mock_providers ./mock_providers
# proxy/default_config/gateway.yaml links to it: the wheel carries the file itself.
COPY config/gateway.yaml ./config/gateway.yaml
# Every dependency ships binary wheels for CPython 3.11 on amd64/arm64, so no compiler is needed here.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.10-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAYAGG_CONFIG=/etc/payagg/gateway.yaml
# The wheels are bind-mounted from the builder, never copied, so no layer of this image holds them.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
 && groupadd --system --gid 10001 payagg \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin payagg
# The git commit the image is built from, shown in payagg_build_info:
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" .
ARG REVISION=unknown
ENV PAYAGG_REVISION=${REVISION}
# Owned by root: the service user reads the config but cannot rewrite it.
COPY config/gateway.yaml /etc/payagg/gateway.yaml
USER 10001:10001
EXPOSE 8080
# The slim image has no curl; python's urllib raises (exit 1) on a refused connection or a non-2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["payagg", "serve"]
