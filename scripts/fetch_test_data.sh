#!/usr/bin/env bash
# Real images the integration tests use, taken from Debian packages (nothing is committed):
#   python3-skimage  -> astronaut.png (attention maps)
#   visp-images-data -> the first 20 frames of ViSP's mbt/cube sequence (video segmentation)
# Usage: scripts/fetch_test_data.sh [DEST]   (default: target/test-data)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-target/test-data}"
if [ -f "$dest/.complete" ]; then exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download python3-skimage visp-images-data >/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
mkdir -p "$dest/cube"
cp "$work/x/usr/lib/python3/dist-packages/skimage/data/astronaut.png" "$dest/"
for i in $(seq 0 19); do
  cp "$work/x/usr/share/visp-images-data/ViSP-images/mbt/cube/image$(printf %04d "$i").pgm" "$dest/cube/"
done
touch "$dest/.complete"
echo "test data in $dest"
