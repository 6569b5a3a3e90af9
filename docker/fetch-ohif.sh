#!/bin/sh
# Usage: fetch-ohif PIN_JSON DESTINATION
#
# Downloads the prebuilt OHIF viewer named by PIN_JSON (package, version, integrity) from the npm
# registry with `npm pack`, refuses it unless its sha512 matches the pinned integrity, and unpacks
# its dist/ folder into DESTINATION. The same pin drives the native runner's download.
set -eu

pin=$(realpath "$1")
destination=$2

pinned() {
	node -e 'const pin = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
process.stdout.write(String(pin[process.argv[2]]));' "$pin" "$1"
}

package=$(pinned package)
version=$(pinned version)
integrity=$(pinned integrity)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "fetch-ohif: npm pack $package@$version"
tarball=$(npm pack --silent "$package@$version")
actual=sha512-$(node -e 'const fs = require("fs");
const hash = require("crypto").createHash("sha512").update(fs.readFileSync(process.argv[1]));
process.stdout.write(hash.digest("base64"));' "$tarball")
if [ "$actual" != "$integrity" ]; then
	echo "fetch-ohif: $tarball has integrity $actual, but ohif/pin.json pins $integrity" >&2
	exit 1
fi
mkdir -p "$destination"
tar -xzf "$tarball" -C "$destination" --strip-components=2 package/dist
echo "fetch-ohif: $package@$version verified and unpacked into $destination"
