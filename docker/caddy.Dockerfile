# Caddy, the only web listener, from Debian's packages, with the pinned OHIF viewer build inside.

# The Debian release the image is built on: trixie (Debian 13, the default) or bookworm (Debian 12).
# compose.yaml passes PACS_DEBIAN_RELEASE; the packages are whatever that release ships.
ARG DEBIAN_RELEASE=trixie

# Stage 1: fetch the prebuilt viewer pinned in ohif/pin.json and check it against the pinned
# integrity. dpkg's force-unsafe-io: see orthanc.Dockerfile (npm brings some 300 small packages).
FROM debian:${DEBIAN_RELEASE}-slim AS ohif
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-o Dpkg::Options::=--force-unsafe-io ca-certificates npm \
	&& rm -rf /var/lib/apt/lists/*
COPY docker/registry-ca.sh /usr/local/bin/registry-ca
COPY docker/fetch-ohif.sh /usr/local/bin/fetch-ohif
COPY ohif/pin.json /build/pin.json
# PEM certificates of a TLS-inspecting proxy on the way to the registry, if any: see registry-ca.sh.
ARG BUILD_CA_CERTIFICATES=
RUN registry-ca fetch-ohif /build/pin.json /srv/ohif

# Stage 2: Caddy and the viewer's files (its app-config.js comes from the control plane).
FROM debian:${DEBIAN_RELEASE}-slim

# policy-rc.d keeps the package scripts from starting Caddy's system service during the build.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
	&& chmod +x /usr/sbin/policy-rc.d \
	&& apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-o Dpkg::Options::=--force-unsafe-io caddy \
	&& rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d

# The same unprivileged user, uid 10001, in all three images: they share the data volume.
RUN groupadd --gid 10001 pacs \
	&& useradd --uid 10001 --gid pacs --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pacs \
	&& install -d -o pacs -g pacs -m 0700 /data

COPY --from=ohif /srv/ohif /srv/ohif
COPY docker/await-file.sh /usr/local/bin/await-file

# Caddy keeps its autosaved configuration and state in the data volume, as the native runner does.
ENV XDG_CONFIG_HOME=/data/cache/caddy/config \
	XDG_DATA_HOME=/data/cache/caddy/data \
	PACS_OHIF_ROOT=/srv/ohif
USER pacs
VOLUME /data
EXPOSE 3000
CMD ["await-file", "/data/run/Caddyfile", "caddy", "run", "--config", "/data/run/Caddyfile", "--adapter", "caddyfile"]
