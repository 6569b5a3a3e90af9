# The control plane: the Flask application under gunicorn, with the pinned requirements.txt in a
# virtual environment. At every start `python -m control --data /data serve` creates what is missing
# in the data volume (folders, secrets, database, first admin), renders the Orthanc and Caddy
# configurations there for the other two containers, then runs gunicorn on port 8000.

# The Debian release the image is built on: trixie (Debian 13, the default) or bookworm (Debian 12).
# compose.yaml passes PACS_DEBIAN_RELEASE; the packages are whatever that release ships.
ARG DEBIAN_RELEASE=trixie
FROM debian:${DEBIAN_RELEASE}-slim

# dpkg's force-unsafe-io: see orthanc.Dockerfile. postgresql-client: pg_dump and pg_restore, with
# which `backup` and `restore` copy databases on PostgreSQL (compose.nodes.yaml's), of the same
# release as the postgresql image's server.
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-o Dpkg::Options::=--force-unsafe-io ca-certificates python3 python3-venv postgresql-client \
	&& rm -rf /var/lib/apt/lists/*

# The same unprivileged user, uid 10001, in all three images: they share the data volume.
RUN groupadd --gid 10001 pacs \
	&& useradd --uid 10001 --gid pacs --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pacs \
	&& install -d -o pacs -g pacs -m 0700 /data

ENV PATH=/opt/venv/bin:$PATH \
	PYTHONDONTWRITEBYTECODE=1 \
	PYTHONUNBUFFERED=1
COPY docker/registry-ca.sh /usr/local/bin/registry-ca
COPY requirements.txt /app/requirements.txt
# PEM certificates of a TLS-inspecting proxy on the way to the registry, if any: see registry-ca.sh.
ARG BUILD_CA_CERTIFICATES=
RUN python3 -m venv /opt/venv \
	&& registry-ca pip install --no-cache-dir --disable-pip-version-check -r /app/requirements.txt

# The control plane reads templates and files relative to the repository (the configuration
# templates, the OHIF pin, the downloader it offers), so keep the repository's layout.
COPY control /app/control
COPY downloader /app/downloader
COPY orthanc /app/orthanc
COPY proxy /app/proxy
COPY ohif /app/ohif
WORKDIR /app

USER pacs
VOLUME /data
EXPOSE 8000
CMD ["python", "-m", "control", "--data", "/data", "serve"]
