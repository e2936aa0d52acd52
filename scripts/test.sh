#!/usr/bin/env bash
# Runs every test of the workspace. Fetches the default model (SmolLM2-135M-Instruct, via pip)
# first, so the end-to-end tests against the reference fixtures run; without it they say
# `skipped: model not found`; and NVRTC, so that every CUDA kernel compiles (no GPU needed).
# Then the official `openai` client against `kivi serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! scripts/fetch-models.sh smollm2; then
    echo "warning: could not fetch the default model; model tests will be skipped" >&2
fi
# NVRTC (no GPU needed) lets `kivi-cuda`'s compile test build every CUDA kernel module.
if nvrtc_dir=$(scripts/fetch-nvrtc.sh); then
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "warning: could not fetch NVRTC; the CUDA kernel compile test will be skipped" >&2
fi
cargo test --workspace --release "$@"
# The official `openai` Python client against `kivi serve` (skipped without the model).
scripts/test-openai.sh
