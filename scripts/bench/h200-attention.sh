#!/bin/bash
# The device call behind docs/benchmarks.md "CUDA decode attention (H200)": the kivi-cuda GPU
# tests, compute-sanitizer (memcheck, racecheck) on small attention runs, then `kivi bench
# attention` (f16, KIVI-2, KIVI-4; tensor cores, and the CUDA-core kernel with KIVI_CUDA_SIMT=1 on
# a subset) and PyTorch SDPA on the same shapes, optionally an Nsight Compute profile of the KIVI-2
# kernel. Expects in $D the `kivi` binary and the stripped kivi-cuda
# test binaries as t_cache, t_model, t_runner (`cargo test --release -p kivi-cuda --no-run` prints
# their paths); $OUT for outputs. Run from the repository root on the GPU machine.
D=${D:-.dev/tc}
R=$(pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64:$LD_LIBRARY_PATH
export KIVI_CUDA_CACHE=/tmp/kcache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
for t in t_cache t_model t_runner; do
  timeout 200 $D/$t --test-threads=1 --nocapture > $OUT/$t.log 2>&1
  echo "$t rc=$?: $(grep 'test result' $OUT/$t.log)"
done
grep -hE "worst|skipped" $OUT/t_*.log | cut -c1-200
# compute-sanitizer on small attention runs of every cache, head shape and CTA kind: memcheck
# (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards), which the host
# emulator cannot see (session 30: a 4-byte-aligned shared array read as uint2 faulted on the GPU
# only, after an unrelated change moved it).
SAN=/usr/local/cuda/bin/compute-sanitizer
for tool in memcheck racecheck; do
  for w in 1 4; do
    KIVI_CUDA_WARPS=$w timeout 200 $SAN --tool $tool --print-limit 5 --error-exitcode 7 $D/kivi bench attention \
      --device cuda --caches f16,kivi2,kivi4 --shapes 4/4/128,32/8/128,9/3/64 --batch 1,3 --context 700,2100 \
      --reps 1 --inner 1 > $OUT/san_${tool}_$w.txt 2>&1
    echo "$tool warps $w rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/san_${tool}_$w.txt | head -1)"
  done
done
timeout 150 $D/kivi bench attention --device cuda --reps 9 --json $OUT/kivi.jsonl > $OUT/bench.txt 2>&1
KIVI_CUDA_SIMT=1 timeout 100 $D/kivi bench attention --device cuda --reps 9 --caches kivi2,kivi4 \
  --batch 8,32 --context 4096,32768 --json $OUT/simt.jsonl > $OUT/simt.txt 2>&1
timeout 120 python3 $R/scripts/bench/sdpa_decode.py --kivi-json $OUT/kivi.jsonl --reps 9 \
  --json $OUT/sdpa.jsonl > $OUT/sdpa.txt 2>&1
grep "^|" $OUT/sdpa.txt
if [ -n "$NCU" ] && command -v ncu > /dev/null; then
  timeout 120 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section LaunchStats -k regex:kivi_attn_d128_k2 --launch-skip 3 --launch-count 1 \
    $D/kivi bench attention --device cuda --caches kivi2 --shapes 32/32/128 --batch 32 \
    --context 32768 --reps 1 --inner 1 > $OUT/ncu.txt 2>&1
fi
