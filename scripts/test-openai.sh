#!/usr/bin/env bash
# The official `openai` Python client against `kivi serve` on the default model: installs the
# client (pip, user-level), builds and starts the server on a free loopback port, runs
# scripts/test-openai.py, and always stops the server. Skipped when the model is not cached.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${KIVI_CACHE:-$HOME/.cache/kivi}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$model" ]]; then
    echo "test-openai: skipped: model not found ($model; run scripts/fetch-models.sh)"
    exit 0
fi

if ! python3 -c "import openai" 2>/dev/null; then
    python3 -m pip install --user --quiet --disable-pip-version-check openai
fi

cargo build --release --quiet --bin kivi
kivi="${CARGO_TARGET_DIR:-target}/release/kivi"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$kivi" serve --model "$model" --port "$port" 2>"$log" &
server=$!
stop_server() {
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -f "$log"
}
trap stop_server EXIT

status=0
python3 scripts/test-openai.py "http://127.0.0.1:$port" || status=$?
if ! kill -0 "$server" 2>/dev/null; then
    echo "test-openai: the server exited early" >&2
    status=1
fi
if grep -q "panicked" "$log"; then
    echo "test-openai: the server panicked" >&2
    status=1
fi
if [[ $status -ne 0 ]]; then
    echo "--- server log ---" >&2
    cat "$log" >&2
fi
exit "$status"
