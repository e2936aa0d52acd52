#!/usr/bin/env bash
# Fetches NVRTC (the CUDA run-time compiler, libnvrtc) from its Python package into
# $KIVI_CACHE/nvrtc (default ~/.cache/kivi/nvrtc) and prints that folder: with it on
# LD_LIBRARY_PATH, `cargo test -p kivi-cuda --test compile` compiles every CUDA kernel module
# without a GPU or driver (the GPU tests still say `skipped`). Idempotent; checks the wheel's
# SHA-256. Needs python3 with pip; 58 MB download.
set -euo pipefail

cache=${KIVI_CACHE:-$HOME/.cache/kivi}
dir="$cache/nvrtc"
VERSION=13.5.37
WHEEL=nvidia_cuda_nvrtc-$VERSION-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl
SHA=86b4d68058807988b7d9af5b44917a0601e9c337f35ccd657bfb3c759ff8d8bc

die() { echo "fetch-nvrtc: $*" >&2; exit 1; }

if [[ -f $dir/libnvrtc.so.13 && -f $dir/.version && $(cat "$dir/.version") == "$VERSION" ]]; then
    echo "$dir"
    exit 0
fi
python3 -m pip --version >/dev/null 2>&1 || die "python3 with pip is needed (python3 -m pip download)"
mkdir -p "$cache/whl" "$dir"
if [[ ! -f $cache/whl/$WHEEL ]]; then
    python3 -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: \
        --platform manylinux2010_x86_64 -d "$cache/whl" "nvidia-cuda-nvrtc==$VERSION" >&2 \
        || die "pip download failed for nvidia-cuda-nvrtc==$VERSION"
fi
got=$(sha256sum "$cache/whl/$WHEEL" | cut -d' ' -f1)
[[ $got == "$SHA" ]] || { rm -f "$cache/whl/$WHEEL"; die "$WHEEL: SHA-256 $got, expected $SHA"; }
python3 - "$cache/whl/$WHEEL" "$dir" <<'PY' || die "could not extract libnvrtc"
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    libs = [n for n in z.namelist() if os.path.basename(n).startswith("libnvrtc")]
    if not libs:
        sys.exit(f"{wheel}: no libnvrtc")
    for name in libs:
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            dst.write(src.read())
PY
echo "$VERSION" >"$dir/.version"
echo "$dir"
