# PostgreSQL, from Debian's packages: the control plane's database and the archive's index of a
# portal with several archive nodes (compose.nodes.yaml). The cluster lives in the volume
# mounted at /var/lib/postgresql/data; docker/postgresql-start.sh makes it at the first start.
# The Debian release, as the other images' (orthanc.Dockerfile).
ARG DEBIAN_RELEASE=trixie
FROM debian:${DEBIAN_RELEASE}-slim

# policy-rc.d keeps the package scripts from starting a cluster of their own during the build;
# dpkg's force-unsafe-io: see orthanc.Dockerfile.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
	&& chmod +x /usr/sbin/policy-rc.d \
	&& apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		-o Dpkg::Options::=--force-unsafe-io postgresql postgresql-contrib \
	&& rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
	&& install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data

COPY docker/postgresql-start.sh /usr/local/bin/postgresql-start
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
CMD ["postgresql-start"]
