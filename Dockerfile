# WhatsApp Delivery Exporter: a small image that runs `whatsapp-exporter` as a non-root user.
#
#   docker build -t whatsapp-exporter .
#   docker run -d -p 10467:10467 \
#     -v "$PWD/config.yaml:/etc/whatsapp-exporter/config.yaml:ro" \
#     -v whatsapp-ledger:/var/lib/whatsapp-exporter whatsapp-exporter
#   docker run --rm -p 10467:10467 whatsapp-exporter --demo    # no config: built-in simulators
#
# Needs BuildKit (the default builder of Docker >= 23, docker compose and buildah/podman) for
# the `RUN --mount` that installs the wheels without copying them into a layer.

# ---- build: wheels of the exporter and of every dependency (all ship binary wheels) ----------
# the same pinned base in both stages: the wheels match the interpreter that installs them
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# only what the package build reads (.dockerignore keeps the rest out of the context)
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
COPY simulators/ simulators/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the wheels installed into a clean base, no compiler, no caches -----------------
FROM python:3.11.13-slim-bookworm

# the release's version, revision and repository (a release build passes them as --build-arg;
# the revision shows in --version and whatsapp_exporter_build_info)
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=https://github.com/whatsapp-delivery-exporter/whatsapp-delivery-exporter
LABEL org.opencontainers.image.title="whatsapp-exporter" \
      org.opencontainers.image.description="Prometheus exporter for WhatsApp gateway providers: WhatsGate, Betatel, D7 Networks, Kaleyra" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WHATSAPP_EXPORTER_REVISION=${REVISION} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# --no-index: nothing but the wheels built above is installed (the exporter's own wheel pulls
# in its dependencies from the same directory)
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
 && groupadd --gid 10467 whatsapp-exporter \
 && useradd --uid 10467 --gid 10467 --no-create-home --home-dir /var/lib/whatsapp-exporter \
      --shell /usr/sbin/nologin whatsapp-exporter \
 && mkdir -p /etc/whatsapp-exporter /var/lib/whatsapp-exporter \
 && chown 10467:10467 /var/lib/whatsapp-exporter \
 && chmod 0750 /var/lib/whatsapp-exporter

# every key explained; mount the real config (read-only) at /etc/whatsapp-exporter/config.yaml
COPY config.example.yaml /etc/whatsapp-exporter/config.example.yaml

# the exporter's state (the D7 ledger, SQLite, WAL, as d7.db): keep it on a volume so tracked ids
# and counters survive restarts
VOLUME ["/var/lib/whatsapp-exporter"]
WORKDIR /var/lib/whatsapp-exporter
USER 10467:10467
EXPOSE 10467

# /-/healthy answers 200 while the process serves; stdlib only. It asks port 10467: a container
# started with another --web.listen-address port needs its own healthcheck (or --no-healthcheck).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:10467/-/healthy', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["whatsapp-exporter"]
CMD ["--config.file=/etc/whatsapp-exporter/config.yaml", "--storage.path=/var/lib/whatsapp-exporter"]
