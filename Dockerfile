# The product's one image: offload-webhook, offload-sidecar and offload-certs.
#
#   buildah build -t localhost/offload:0.1.0 .                       # base made here (see below)
#   buildah build --build-arg BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm \
#       -t registry.example.com/offload:0.1.0 .                      # from a public base
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv module. The default,
# localhost/offload-base:bookworm, is a root filesystem made from Debian's packages by
# tests/e2e/node/build-images.sh (mmdebstrap), so no container registry is needed.
# The result has no shell, no package manager and runs as 65532:65532; every command is
# exec'd directly (the venv's console scripts), so nothing needs a shell at run time.
ARG BASE_IMAGE=localhost/offload-base:bookworm

FROM ${BASE_IMAGE} AS build
# pip verifies PyPI with this CA bundle: the base's own, unless the build mounts another over it
# (tests/e2e/node/build-images.sh mounts the build machine's, for a TLS-inspecting proxy);
# either way it is not part of the image.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/offload
# Dependencies first, in their own layer: a source change does not download them again.
COPY pyproject.toml /src/pyproject.toml
RUN /opt/offload/bin/python -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies'] + d['build-system']['requires']))" > /tmp/requirements.txt \
 && /opt/offload/bin/pip install --no-compile -r /tmp/requirements.txt
COPY README.md /src/README.md
COPY crds/ /src/crds/
COPY certs/ /src/certs/
COPY sidecar/ /src/sidecar/
COPY webhook/ /src/webhook/
# The kubernetes client's asyncio flavour (kubernetes.aio, 70 MB with aiohttp) is never
# imported: the webhook uses the synchronous client, the sidecar its own small one.
# The root filesystem is read-only at run time: the bytecode is compiled now, checked by
# hash rather than timestamps. The last step proves that every entry point still imports.
RUN /opt/offload/bin/pip install --no-compile --no-deps --no-build-isolation /src \
 && /opt/offload/bin/pip uninstall --yes aiohttp aiohttp-retry setuptools wheel pip \
 && rm -rf /opt/offload/lib/python3*/site-packages/kubernetes/aio \
 && /opt/offload/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/offload/lib \
 && /opt/offload/bin/python -c "import webhook.cli, webhook.cache, webhook.controller.main, sidecar.cli, certs.cli, kubernetes.client, kubernetes.watch"

# What the final image holds: the base and the venv, without shells, package tools and docs.
FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/offload /opt/offload
RUN set -eu; \
    echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'nonroot:x:65532:' >> /etc/group; \
    rm -rf /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/python-wheels \
        /usr/share/perl* /usr/lib/*-linux-gnu/perl* /usr/lib/*-linux-gnu/libperl* /usr/lib/*-linux-gnu/gconv \
        /var/cache/* /var/lib/apt /var/log/* /etc/apt \
        /usr/lib/python3*/ensurepip /usr/lib/python3*/lib2to3 /usr/lib/python3*/idlelib \
        /usr/lib/python3*/tkinter /usr/lib/python3*/pydoc_data /usr/lib/python3*/test \
        /usr/local/lib/python3*/ensurepip /usr/local/lib/python3*/idlelib /usr/local/lib/python3*/test \
        /usr/local/lib/python3*/site-packages/pip* /usr/local/bin/pip*; \
    rm -f /usr/bin/apt* /usr/bin/dpkg* /usr/bin/perl* /usr/sbin/dpkg* \
        /usr/bin/bash /usr/bin/rbash /usr/bin/dash /usr/bin/sh /bin/bash /bin/rbash /bin/dash /bin/sh

FROM scratch
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
COPY --from=runtime / /
ENV PATH=/opt/offload/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /
CMD ["offload-webhook", "--help"]
LABEL org.opencontainers.image.title="offload" \
      org.opencontainers.image.description="Model offloading for Kubernetes: offload-webhook, offload-sidecar and offload-certs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
