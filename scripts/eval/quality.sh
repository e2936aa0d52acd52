#!/usr/bin/env bash
# Regenerates the measurements behind docs/quality.md (SmolLM2-135M and Qwen2.5-Coder-1.5B, CPU).
#   scripts/eval/quality.sh [OUT_DIR]        (default: docs/quality-data)
# Needs the default model (scripts/fetch-models.sh smollm2) and texts (scripts/fetch-data.sh).
# Runs one evaluation at a time; on a quiet 2-core machine sections 1-4 take about an hour,
# sections 5-7 (Qwen2.5-Coder-1.5B, needs scripts/fetch-models.sh qwen) about three more.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/quality-data}
DATA=${KIVI_CACHE:-$HOME/.cache/kivi}/data
KIVI=${KIVI:-target/release/kivi}
mkdir -p "$OUT"
[ -x "$KIVI" ] || cargo build --release -p kivi-cli
PP="$DATA/austen/prideprejudice.txt"

# 1. chunk 1 (exact decode semantics) against chunk 16, 500 tokens.
for c in 1 16; do
  "$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 500 --chunk "$c" \
    --caches kivi4,k4v2,kivi2,kivi2:r0,kivi2:kt --out "$OUT/ppl-chunk$c-500.json" | tee "$OUT/ppl-chunk$c-500.md"
done

# 2. Ablations, 1,500 tokens, exact decode semantics.
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 1500 --chunk 1 \
  --caches kivi8,kivi4,k4v2,k2v4,k8v2,kivi2,kivi2:sink4,kivi2:g16,kivi2:r0,kivi2:r32,kivi2:r64,kivi2:kt,kivi2:vc,kivi2:kt:vc,k4v2:sink4,k4v2:g16:sink4 \
  --out "$OUT/ppl-ablation-1500.json" | tee "$OUT/ppl-ablation-1500.md"

# 2b. Every token quantized (R = 0, like llama.cpp) and 3.5-bit candidates.
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 1500 --chunk 1 \
  --caches kivi4:r0,k4v2:sink4:r0,k4v2:g64:sink4:r0,k4v2:g64:sink4,kivi2:g16:sink4 \
  --out "$OUT/ppl-beyond-1500.json" | tee "$OUT/ppl-beyond-1500.md"
scripts/eval/pareto.py "$OUT/ppl-ablation-1500.json" "$OUT/ppl-beyond-1500.json" "$OUT/pareto.svg"

# 3. Passkey retrieval, 1K/2K tokens, 5 depths (add 4k,8k / --trials 3 with more CPU time).
"$KIVI" eval passkey --caches kivi4,k4v2:sink4,kivi2 --lengths 1k,2k --depths 0,25,50,75,100 \
  --out "$OUT/passkey-1k2k.json" --png "$OUT/passkey-1k2k.png" | tee "$OUT/passkey-1k2k.md"
"$KIVI" eval passkey --caches k4v2:g64:sink4 --lengths 1k,2k --depths 0,25,50,75,100 \
  --out "$OUT/passkey-1k2k-g64.json" --png "$OUT/passkey-1k2k-g64.png" | tee "$OUT/passkey-1k2k-g64.md"

# 4. Figure 2: key and value channel magnitudes.
"$KIVI" inspect --layers 0,15,29 --heads all --max-tokens 512 --out-dir "$OUT/inspect" | tee "$OUT/inspect.md"

# 5. HumanEval pass@1 on Qwen2.5-Coder-1.5B, all 164 problems (f16 runs first as the baseline).
QWEN=${KIVI_CACHE:-$HOME/.cache/kivi}/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
"$KIVI" eval humaneval --model "$QWEN" --caches k4v2:g64:sink4 --batch 64 \
  --out "$OUT/humaneval-qwen-164.json" | tee "$OUT/humaneval-qwen-164.md"

# 6. 8,192 scored tokens per model (8 windows of 1,024 tokens of Pride and Prejudice from
#    "Chapter 1", scored together), exact decode semantics.
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 8192 --windows 8 --chunk 1 \
  --caches kivi8,kivi4,k4v2,k2v4,kivi2,kivi2:sink4,kivi2:g16,k4v2:sink4,k4v2:g64:sink4,kivi2:r0,kivi2:kt \
  --out "$OUT/ppl-smollm2-8k.json" | tee "$OUT/ppl-smollm2-8k.md"
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 8192 --windows 8 --chunk 1 \
  --caches kivi4,kivi4:sink4,kivi4:g64:sink4 \
  --out "$OUT/ppl-smollm2-8k-kivi4sink.json" | tee "$OUT/ppl-smollm2-8k-kivi4sink.md"
"$KIVI" eval ppl --model "$QWEN" --file "$PP" --start-at "Chapter 1" --max-tokens 8192 --windows 8 --chunk 1 \
  --caches kivi4,k4v2:g64:sink4,kivi2 \
  --out "$OUT/ppl-qwen-8k.json" | tee "$OUT/ppl-qwen-8k.md"

# 7. Per-layer key bits: a scan of 5-layer blocks, then layers chosen on the fly (k4@auto<N>),
#    1,500 tokens and 8K; the per-layer key and logit errors from kivi inspect.
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 1500 --chunk 1 \
  --caches kivi2:sink4,kivi2:sink4:k4@0-4,kivi2:sink4:k4@5-9,kivi2:sink4:k4@10-14,kivi2:sink4:k4@15-19,kivi2:sink4:k4@20-24,kivi2:sink4:k4@25-29,kivi2:sink4:k4@0,kivi2:sink4:k4@0-1 \
  --out "$OUT/ppl-layers-scan-1500.json" | tee "$OUT/ppl-layers-scan-1500.md"
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 1500 --chunk 1 \
  --caches kivi2:sink4,kivi2:sink4:k4@auto5,kivi2:sink4:k4@auto10,kivi2:sink4:k4@15-24,kivi2:sink4:k4@auto15,k4v2:g64:sink4,k4v2:sink4 \
  --out "$OUT/ppl-layers-auto-1500.json" | tee "$OUT/ppl-layers-auto-1500.md"
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 1500 --chunk 1 \
  --caches kivi2:g64:sink4,kivi2:g64:sink4:k4@auto10,kivi2:g64:sink4:k4@auto15,kivi2:g64:sink4:k4@auto20,kivi2:sink4:k4@auto5,kivi2:sink4:k4@auto10 \
  --out "$OUT/ppl-layers-auto-g64-1500.json" | tee "$OUT/ppl-layers-auto-g64-1500.md"
"$KIVI" inspect --layers "$(seq -s, 0 29)" --heads all --max-tokens 1500 --out-dir /tmp/kivi-inspect-all \
  > "$OUT/inspect-all-layers-1500.md"
"$KIVI" eval ppl --file "$PP" --start-at "Chapter 1" --max-tokens 8192 --windows 8 --chunk 1 \
  --caches kivi2:sink4,kivi2:g64:sink4:k4@auto15,kivi2:g64:sink4:k4@0-14,kivi2:g64:sink4:k4@auto20,kivi2:sink4:k4@auto5 \
  --out "$OUT/ppl-smollm2-8k-layers.json" | tee "$OUT/ppl-smollm2-8k-layers.md"
"$KIVI" eval ppl --model "$QWEN" --file "$PP" --start-at "Chapter 1" --max-tokens 8192 --windows 8 --chunk 1 \
  --caches kivi2:sink4,kivi2:g64:sink4:k4@auto14 \
  --out "$OUT/ppl-qwen-8k-layers.json" | tee "$OUT/ppl-qwen-8k-layers.md"
scripts/eval/pareto.py "$OUT/ppl-smollm2-8k.json" "$OUT/ppl-smollm2-8k-layers.json" "$OUT/pareto-smollm2-8k.svg"
scripts/eval/pareto.py "$OUT/ppl-qwen-8k.json" "$OUT/pareto-qwen-8k.svg"

# 8. Passkey at 4K and 8K tokens, 2 trials per cell; Qwen2.5-Coder-1.5B at 1K-4K, 1 trial.
"$KIVI" eval passkey --model "$QWEN" --caches k4v2:g64:sink4,kivi2 --lengths 1k,2k,4k \
  --depths 0,25,50,75,100 --trials 1 --out "$OUT/passkey-qwen.json" --png "$OUT/passkey-qwen.png" \
  | tee "$OUT/passkey-qwen.md"
"$KIVI" eval passkey --caches kivi4,k4v2:g64:sink4,kivi2 --lengths 4k,8k --depths 0,25,50,75,100 --trials 2 \
  --out "$OUT/passkey-4k8k.json" --png "$OUT/passkey-4k8k.png" | tee "$OUT/passkey-4k8k.md"
