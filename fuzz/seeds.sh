#!/usr/bin/env bash
# Builds fuzz/corpus/<target>/ seeds: tiny complete models, an every-type GGUF, request bodies,
# and small files derived from the real models' headers in ~/.cache/kivi/models (when present).
# Uses the same build as the fuzz targets (cargo-fuzz on stable, see docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")"
shopt -s nullglob
RUSTC_BOOTSTRAP=1 cargo fuzz build -O --debug-assertions make_seeds
target/x86_64-unknown-linux-gnu/release/make_seeds corpus ~/.cache/kivi/models/*.gguf
