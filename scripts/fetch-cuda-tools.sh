#!/usr/bin/env bash
# Fetches NVRTC (scripts/fetch-nvrtc.sh) plus ptxas, cuobjdump and nvdisasm from their Python packages into
# $KIVI_CACHE/cuda-tools (default ~/.cache/kivi/cuda-tools) and prints that folder: with them a
# kernel's registers, spills and SASS can be read without a GPU
# (scripts/bench/kernel_resources.py). Idempotent; checks each wheel's SHA-256. Needs python3
# with pip; 53 MB download (plus NVRTC's 58 MB).
set -euo pipefail

cache=${KIVI_CACHE:-$HOME/.cache/kivi}
dir="$cache/cuda-tools"
VERSION=13.5.37
TAG=py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64
# package, wheel SHA-256, member
WHEELS=(
    "nvidia-cuda-nvcc f5c4f7ead5d964fb4af42bbf1e6d3ec3c1e6e9d83b53749f691d387e7fcaa3a7 nvidia/cu13/bin/ptxas"
    "nvidia-cuda-cuobjdump 38780fee50863252a0b8926357faa91615ca1c8346490563f33a06100cd73f58 nvidia/cu13/bin/cuobjdump"
    "nvidia-cuda-nvdisasm d3fdbdd49fa53e2e4aacd3db8259d052bd2b049ececdcb69e92e083c6728e7ca nvidia/cu13/bin/nvdisasm"
)

die() { echo "fetch-cuda-tools: $*" >&2; exit 1; }

nvrtc=$(scripts/fetch-nvrtc.sh) || die "could not fetch NVRTC"
mkdir -p "$cache/whl" "$dir"
for w in "${WHEELS[@]}"; do
    read -r pkg sha member <<<"$w"
    tool=$(basename "$member")
    [[ -x $dir/$tool && -f $dir/.$tool.version && $(cat "$dir/.$tool.version") == "$VERSION" ]] && continue
    wheel="$cache/whl/${pkg//-/_}-$VERSION-$TAG.whl"
    if [[ ! -f $wheel ]]; then
        python3 -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: \
            --platform manylinux2014_x86_64 -d "$cache/whl" "$pkg==$VERSION" >&2 \
            || die "pip download failed for $pkg==$VERSION"
    fi
    got=$(sha256sum "$wheel" | cut -d' ' -f1)
    [[ $got == "$sha" ]] || { rm -f "$wheel"; die "$wheel: SHA-256 $got, expected $sha"; }
    python3 -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
        "$wheel" "$member" "$dir/$tool" || die "could not extract $member"
    chmod +x "$dir/$tool"
    echo "$VERSION" >"$dir/.$tool.version"
done
ln -sf "$nvrtc"/libnvrtc.so.13 "$dir/libnvrtc.so.13"
ln -sf "$nvrtc"/libnvrtc-builtins.so.13.5 "$dir/libnvrtc-builtins.so.13.5"
echo "$dir"
