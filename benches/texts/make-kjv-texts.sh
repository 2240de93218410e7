#!/usr/bin/env bash
# Regenerate the shipped King James Version texts from Debian's `bible-kjv` (apt-get install
# bible-kjv): chapter headings and verse numbers dropped, one paragraph per chapter.
#   benches/texts/make-kjv-texts.sh [BIBLE_BINARY [DATA_DIR]]
set -euo pipefail
cd "$(dirname "$0")"
bible=${1:-bible}
args=()
if [ -n "${2:-}" ]; then args=(-p "$2"); fi

chapters() { # book first last -> the chapters as paragraphs
    local book=$1 c
    for c in $(seq "$2" "$3"); do
        "$bible" "${args[@]}" -l100000 "$book $c:1-200" |
            sed -n 's/^ *[0-9][0-9]* //p' | paste -sd' '
        echo
    done
}

# Calibration: four books of different kinds (narrative, law, wisdom, letters).
chapters Genesis 1 4 >kjv-genesis.txt
chapters Exodus 19 21 >kjv-exodus.txt
chapters Proverbs 1 4 >kjv-proverbs.txt
chapters Romans 1 3 >kjv-romans.txt
# Evaluation: a book none of the calibration texts contains.
chapters Luke 1 2 >kjv-luke.txt
