#!/bin/sh
# Usage: registry-ca COMMAND [ARGUMENT...]
#
# Runs COMMAND, a download from a package registry during an image build, trusting besides
# Debian's certificate authorities those given as PEM text in the build argument
# BUILD_CA_CERTIFICATES (compose.yaml fills it from PACS_BUILD_CA_CERTIFICATES). It is for networks
# whose TLS-inspecting proxy signs registry traffic with a local authority. The extra certificates
# live in a temporary bundle for this one command and are not kept in the image.
set -eu

if [ -z "${BUILD_CA_CERTIFICATES:-}" ]; then
	exec "$@"
fi
bundle=$(mktemp)
trap 'rm -f "$bundle"' EXIT
cat /etc/ssl/certs/ca-certificates.crt >"$bundle"
printf '%s\n' "$BUILD_CA_CERTIFICATES" >>"$bundle"
# pip replaces its own bundle with PIP_CERT; Node.js adds NODE_EXTRA_CA_CERTS to its built-in one.
PIP_CERT=$bundle NODE_EXTRA_CA_CERTS=$bundle "$@"
