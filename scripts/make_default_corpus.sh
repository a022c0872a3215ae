#!/usr/bin/env bash
# Assembles the default training corpus from Debian packages: `fortunes` and `bible-kjv`.
# Usage: scripts/make_default_corpus.sh [OUT_DIR]   (default: build/corpus)
# Writes OUT_DIR/fortunes.txt (~2.5 MB) and OUT_DIR/kjv.txt (~4.2 MB), plain UTF-8.
set -euo pipefail
out=${1:-build/corpus}
mkdir -p "$out"
fortunes=/usr/share/games/fortunes
command -v bible >/dev/null || { echo "bible not found: apt-get install bible-kjv" >&2; exit 1; }
[ -d "$fortunes" ] || { echo "$fortunes not found: apt-get install fortunes" >&2; exit 1; }

# Fortune files: skip index (.dat) files and the .u8 symlinks; drop the '%' separators and the
# backspace overstriking some files use for bold text.
for f in "$fortunes"/*; do
    case "$f" in *.dat|*.u8) continue ;; esac
    [ -L "$f" ] && continue
    cat "$f"
done | LC_ALL=C sed -e 's/.\x08//g' -e '/^%$/d' | tr -d '\010' > "$out/fortunes.txt"

# The King James text without its verse numbers and indentation.
bible Gen1:1-Rev22:21 | LC_ALL=C sed -E -e 's/^ +[0-9]+ //' -e 's/^ +//' > "$out/kjv.txt"
wc -c "$out/fortunes.txt" "$out/kjv.txt"
