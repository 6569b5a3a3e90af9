#!/bin/sh
# Usage: await-file FILE COMMAND [ARGUMENT...]
#
# The orthanc and caddy containers start from configuration files that the control container
# renders into the shared data volume. This waits until FILE exists and is not empty, then runs
# COMMAND in its place, with the data directory's umask. PACS_AWAIT_SECONDS (default 300) bounds
# the wait.
set -eu

file=$1
shift
limit=${PACS_AWAIT_SECONDS:-300}
waited=0

# What COMMAND writes into the data volume is readable by the pacs user only, or by the group
# PACS_DATA_GROUP too (the control container puts the existing files right; see control/site.py).
if [ -n "${PACS_DATA_GROUP:-}" ]; then
	umask 027
else
	umask 077
fi

# As process 1 of a container, the shell ignores SIGTERM unless it handles it: stop waiting at once.
trap 'exit 143' TERM INT

while [ ! -s "$file" ]; do
	if [ "$waited" -ge "$limit" ]; then
		echo "await-file: $file did not appear within ${limit} s; it is written by the control" \
			"container when it starts: see its log (docker-compose logs control)." >&2
		exit 1
	fi
	if [ "$waited" -eq 0 ]; then
		echo "await-file: waiting for $file from the control container" >&2
	fi
	sleep 1
	waited=$((waited + 1))
done
exec "$@"
