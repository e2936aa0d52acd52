#!/usr/bin/env bash
# Same-run comparison of `kivi bench model` with llama.cpp's llama-bench on the default model:
# prefill (pp) and decode (tg) tokens/s at context depth 0 and 4096, 2 threads.
#
# llama.cpp is built from the source that the PyPI package llama-cpp-python vendors (no other
# network access needed), without -march=native and without AMX (a native build dies with
# SIGILL on these machines), with AVX-512 + VNNI enabled explicitly. Builds are cached under
# ${KIVI_CACHE:-~/.cache/kivi}/llamacpp.
#
# Usage: scripts/bench/model_vs_llamacpp.sh [threads]   (build kivi first: cargo build --release;
# KIVI_BIN overrides the binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
threads=${1:-2}
cache=${KIVI_CACHE:-$HOME/.cache/kivi}
model=$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-models.sh smollm2 >/dev/null
src=$cache/llamacpp/src
bench=$src/build/bin/llama-bench
if [ ! -x "$bench" ]; then
    mkdir -p "$cache/llamacpp"
    python3 -m pip install -q scikit-build-core cmake ninja
    python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$cache/llamacpp" llama-cpp-python==0.3.36
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$cache/llamacpp/llama_cpp_python-0.3.36.tar.gz" -C "$src" --strip-components=3 \
        llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$src/build" --target llama-bench -j"$(nproc)"
fi
echo "## llama.cpp $(cd "$src" && git describe --always 2>/dev/null || echo 'from llama-cpp-python 0.3.36'), $threads threads, flash attention"
for ctk in f16 q8_0; do
    "$bench" -m "$model" -t "$threads" -fa 1 -ctk $ctk -ctv $ctk -p 128 -n 64 -d 0,4096 -r 2 -o md
done
echo "## kivi $(git rev-parse --short HEAD), $threads threads"
"${KIVI_BIN:-target/release/kivi}" bench model --model "$model" --threads "$threads" \
    --caches f16,kivi2,kivi4 --depth 0,4096 --prompt-tokens 128 --gen-tokens 64
