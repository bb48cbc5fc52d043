# syntax=docker/dockerfile:1
# lssupervisor with the Lightning Stream binary, as a sidecar next to the application that owns the
# LMDB. We never build LS: its binary is copied from the official image.
#
# libc must match: LMDB's lock table is shared by every process that opens the LMDB (the application,
# LS, our workers), and mixing libcs (glibc/musl) or glibc builds from other releases risks locking
# bugs; a binary built on a newer glibc may not even start on an older one. So the Debian release of
# our base follows the LS image (see docs/kubernetes.md):
#   powerdns/lightningstream 0.4.4 .. 0.6.0 -> bookworm;  1.0.0 -> trixie
# Build for older LS with: --build-arg LIGHTNINGSTREAM_VERSION=0.6.0 --build-arg DEBIAN_RELEASE=bookworm
ARG LIGHTNINGSTREAM_VERSION=1.0.0
ARG DEBIAN_RELEASE=trixie
ARG PYTHON_VERSION=3.11

FROM powerdns/lightningstream:${LIGHTNINGSTREAM_VERSION} AS ls

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
# A self-contained virtualenv, copied whole into the final stage (same base, same paths).
# Reproducible: every Python package comes at the version pinned in requirements.lock (`make lock`),
# the build backend included (pinned setuptools, then --no-build-isolation, so no unpinned setuptools
# is fetched for the build).
RUN python -m venv /opt/lssupervisor
COPY requirements.lock /src/
RUN /opt/lssupervisor/bin/pip install --no-cache-dir --constraint /src/requirements.lock pip setuptools
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE /src/
COPY lssupervisor /src/lssupervisor
# Shipped inside the package (lssupervisor/resources.py): units, example configs, demo migrations,
# alert rules and dashboard.
COPY systemd /src/systemd
COPY config /src/config
COPY examples/demo-app/migrations /src/examples/demo-app/migrations
COPY monitoring /src/monitoring
RUN /opt/lssupervisor/bin/pip install --no-cache-dir --no-build-isolation \
        --constraint /src/requirements.lock /src \
    && /opt/lssupervisor/bin/pip check

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
# ca-certificates: LS talks TLS to S3/Azure. util-linux: setpriv --pdeathsig, the exec wrapper that
# makes LS die with a SIGKILLed supervisor.
RUN apt-get update -qq \
    && apt-get install -yqq --no-install-recommends ca-certificates util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ls /usr/local/bin/lightningstream /usr/local/bin/lightningstream
COPY --from=build /opt/lssupervisor /opt/lssupervisor
ENV PATH=/opt/lssupervisor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Run as the user that owns the LMDB. 953 is the pdns user of the powerdns/pdns-auth-* images; set
# these to your application's uid/gid (or override runAsUser/runAsGroup in Kubernetes).
ARG LSSUPERVISOR_UID=953
ARG LSSUPERVISOR_GID=953
RUN groupadd --system --gid ${LSSUPERVISOR_GID} lssupervisor \
    && useradd --system --uid ${LSSUPERVISOR_UID} --gid ${LSSUPERVISOR_GID} --no-create-home \
       --home-dir /var/lib/lssupervisor --shell /usr/sbin/nologin lssupervisor \
    && install -d -o lssupervisor -g lssupervisor -m 0700 /var/lib/lssupervisor \
    && install -d -m 0755 /etc/lssupervisor
USER ${LSSUPERVISOR_UID}:${LSSUPERVISOR_GID}
WORKDIR /var/lib/lssupervisor
VOLUME ["/var/lib/lssupervisor"]

# Graceful stop: the supervisor stops LS in order (stop_timeout) before exiting. Give the container
# at least 90s (docker stop -t 90, Kubernetes terminationGracePeriodSeconds), like the systemd unit.
STOPSIGNAL SIGTERM
# /livez answers on the loopback address from the default http.address 127.0.0.1:8265.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8265/livez', timeout=4)"]
ENTRYPOINT ["lssupervisor", "run", "-c", "/etc/lssupervisor/lssupervisor.yaml"]
