# Orthanc, the DICOM archive, from Debian's packages: the same build as the native runner's.
# It serves DICOM on 4242 (published) and HTTP on 8042 (reached by control and caddy over the
# project network only), with the configuration the control container renders into the data volume.

# The Debian release the image is built on: trixie (Debian 13, the default) or bookworm (Debian 12).
# compose.yaml passes PACS_DEBIAN_RELEASE; the packages are whatever that release ships.
ARG DEBIAN_RELEASE=trixie
FROM debian:${DEBIAN_RELEASE}-slim

# policy-rc.d keeps the package scripts from starting Orthanc's system service during the build.
# dpkg's force-unsafe-io skips an fsync per file, which makes installs several times faster on
# overlay file systems; a build that breaks off is simply run again.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
	&& chmod +x /usr/sbin/policy-rc.d \
	&& apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-o Dpkg::Options::=--force-unsafe-io orthanc orthanc-dicomweb orthanc-postgresql \
	&& rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d

# The same unprivileged user, uid 10001, in all three images: they share the data volume, which
# takes its ownership from the empty /data made here the first time a container mounts it.
RUN groupadd --gid 10001 pacs \
	&& useradd --uid 10001 --gid pacs --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin pacs \
	&& install -d -o pacs -g pacs -m 0700 /data

COPY docker/await-file.sh /usr/local/bin/await-file

USER pacs
VOLUME /data
EXPOSE 4242
# Orthanc's log goes to the data volume, as beside the native runner: the control container reads
# the DICOM requests Orthanc refused there (control/watch.py).
CMD ["await-file", "/data/run/orthanc.json", "Orthanc", "--logfile=/data/logs/orthanc.log", "/data/run/orthanc.json"]
