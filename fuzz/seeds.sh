#!/usr/bin/env bash
# Builds fuzz/corpus/<target>/ seeds: tiny complete models, every-type GGUFs, and small files
# derived from the real models' headers in ~/.cache/kivi/models (when present).
set -euo pipefail
cd "$(dirname "$0")"
shopt -s nullglob
cargo run --release --quiet --bin make_seeds -- corpus ~/.cache/kivi/models/*.gguf
