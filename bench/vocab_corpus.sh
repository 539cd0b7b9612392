#!/usr/bin/env bash
# bench/all.sh: skip
# (the corpus builder of bench/vocab_model.sh, not a benchmark)
# Builds the English corpus of the vocabulary-expert study (bench/vocab_model.sh,
# docs/vocab-experts.md section 9) from text every Debian machine with
# launch/install-deps has, and encodes it with the gpt2 tokenizer (the npm
# tiktoken's encoder, imported by `moe tokenizer import`):
#   - the fortunes (fortunes, fortunes-min: quotes, jokes, literature);
#   - /usr/share/common-licenses and the plain-text documentation under
#     /usr/share/doc (README, NEWS, *.txt, *.md, copyright files; each
#     distinct text once, gzipped ones unpacked);
#   - manual pages of sections 1, 5, 7 and 8 rendered to plain text: every
#     6th of them (sorted by path), about 3000 pages;
#   - the demo corpus (moe data synth, 2 MB).
# Every line loses its leading whitespace and has runs of blanks squeezed to
# one space (rendered manual pages are mostly indentation otherwise).
# Documents are separated by <|endoftext|>. Every 50th document is held out
# for validation.
#
#   bench/vocab_corpus.sh OUT_DIR [MOE_BINARY]
# writes OUT_DIR/{gpt2.json, train.txt, val.txt, train.tok, val.tok, corpus.txt}
# and prints the sizes. Deterministic for a given machine (sorted file lists).
set -euo pipefail
out=${1:?usage: bench/vocab_corpus.sh OUT_DIR [MOE_BINARY]}
root=$(cd "$(dirname "$0")/.." && pwd)
moe=${2:-$root/build/src/cli/moe}
enc=$root/build-deps/node/node_modules/tiktoken/encoders/gpt2.json
[ -f "$enc" ] || { echo "vocab_corpus: $enc missing (run launch/install-deps)" >&2; exit 1; }
mkdir -p "$out"
docs=$(mktemp -d)
trap 'rm -rf "$docs"' EXIT
n=0
add() { # add FILE: one document, if it is text and not seen before
  local f=$1 h
  [ -s "$f" ] || return 0
  grep -Iq . "$f" || return 0 # binary
  h=$(md5sum < "$f" | cut -c1-32)
  [ -e "$docs/seen.$h" ] && return 0
  : > "$docs/seen.$h"
  n=$((n + 1))
  cp "$f" "$docs/$(printf %06d $n).txt"
}
tmp=$docs/tmp
# fortunes: one document per cookie file
for f in $(ls /usr/share/games/fortunes/* 2>/dev/null | grep -v '\.dat$\|\.u8$' | sort); do
  [ -f "$f" ] && add "$f"
done
for f in $(ls /usr/share/common-licenses/* | sort); do [ -f "$f" ] && add "$f"; done
# documentation: plain text, gzipped text unpacked
while IFS= read -r f; do
  case "$f" in
    *.gz) gzip -dc "$f" > "$tmp" 2>/dev/null && add "$tmp" ;;
    *) add "$f" ;;
  esac
done < <(find /usr/share/doc -type f \( -iname 'README*' -o -iname 'NEWS*' -o -name '*.txt' -o -name '*.md' \
         -o -name 'copyright' -o -iname 'AUTHORS*' \) 2>/dev/null | LC_ALL=C sort)
# manual pages, rendered without formatting
while IFS= read -r f; do
  MANWIDTH=80 man -l "$f" 2>/dev/null | col -bx > "$tmp" 2>/dev/null || continue
  add "$tmp"
done < <(find /usr/share/man/man1 /usr/share/man/man5 /usr/share/man/man7 /usr/share/man/man8 -type f -name '*.gz' \
         2>/dev/null | LC_ALL=C sort | awk 'NR % 6 == 0')
# the demo corpus
"$moe" data synth --out "$tmp" --bytes 2M --seed 1 > /dev/null
add "$tmp"
rm -f "$tmp"
# every 50th document is validation
: > "$out/train.txt"
: > "$out/val.txt"
i=0
for f in "$docs"/[0-9]*.txt; do
  i=$((i + 1))
  dst=$out/train.txt
  [ $((i % 50)) -eq 0 ] && dst=$out/val.txt
  sed -E 's/^[[:blank:]]+//; s/[[:blank:]]{2,}/ /g' "$f" >> "$dst"
  printf '\n<|endoftext|>\n' >> "$dst"
done
"$moe" tokenizer import --from "$enc" --out "$out/gpt2.json" > /dev/null
for s in train val; do
  "$moe" data encode --tokenizer "$out/gpt2.json" --data "$out/$s.txt" --out "$out/$s.tok" --threads 2 \
    --doc-sep '<|endoftext|>' --doc-delim '\n<|endoftext|>\n' > /dev/null
done
echo "vocab_corpus: $i documents; train $(stat -c %s "$out/train.txt") bytes, $(( ($(stat -c %s "$out/train.tok") - 64) / 2 )) tokens;" \
     "val $(stat -c %s "$out/val.txt") bytes, $(( ($(stat -c %s "$out/val.tok") - 64) / 2 )) tokens"
