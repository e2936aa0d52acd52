#!/bin/bash
# Why four-head GQA attention CTAs are slower inside the model than in `kivi bench attention`
# (docs/benchmarks.md, "CUDA decode attention (H200)" -> "Session 27"). One device call, ~4 min:
#   1. the attention alone after one of the model's matrix products (`--between`, a Mistral-7B
#      FFN weight of 112 MiB), one-head / four-head CTAs, every kernel's preferred shared-memory
#      carveout left to the driver / at its maximum (KIVI_CUDA_CARVEOUT=100);
#   2. the same four variants inside the model (Mistral-7B shapes, random weights): the attention
#      op's GPU time per pass (`--profile`, B = 8, 4K tokens; session 27: one-head 1.043 ms,
#      four-head 1.237), then decode tok/s at B = 1, with the SM clock sampled alongside.
# Expects the `kivi` binary in $D and $OUT for outputs; run from the repository root on the GPU
# machine. Leaves plans.txt, attention.jsonl, profiles.txt, models.txt and clocks.csv in $OUT.
D=${D:-.dev/oh}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:$LD_LIBRARY_PATH
export KIVI_CUDA_CACHE=/tmp/kcache
K=$D/kivi
$K bench attention --device cuda --shapes 32/8/128 --batch 1 --context 1024 --reps 2 > /dev/null 2>&1
# The plans each variant gets (KIVI_CUDA_TRACE), for the record.
for oh in 1 0; do
  KIVI_CUDA_TRACE=1 KIVI_CUDA_ONE_HEAD=$oh $K bench attention --device cuda --shapes 32/8/128 \
    --batch 1,8 --context 4096,16384 --caches kivi2,kivi4 --reps 1 --inner 1 2>&1 >/dev/null \
    | grep 'attention plan' > $OUT/plans.$oh.txt
done
for co in none 100; do
  for oh in 1 0; do
    if [ $co = none ]; then unset KIVI_CUDA_CARVEOUT; else export KIVI_CUDA_CARVEOUT=$co; fi
    KIVI_CUDA_ONE_HEAD=$oh timeout 60 $K bench attention --device cuda --shapes 32/8/128 \
      --batch 1,8 --context 4096,16384 --caches kivi2,kivi4 --reps 9 --between 112 \
      --json $OUT/attn.$co.$oh.jsonl > /dev/null 2>&1
    echo "attention carveout=$co one_head=$oh rc=$?"
  done
done
for co in none 100; do
  for oh in 1 0; do
    if [ $co = none ]; then unset KIVI_CUDA_CARVEOUT; else export KIVI_CUDA_CARVEOUT=$co; fi
    KIVI_CUDA_ONE_HEAD=$oh timeout 45 $K bench throughput --device cuda --random-weights --arch mistral-7b \
      --kv kivi2 --workload fixed --prompt-len 4096 --output-len 32 --batch 8 --max-batch 8 --profile \
      > $OUT/profile.$co.$oh.txt 2>&1
    echo "profile carveout=$co one_head=$oh rc=$? $(grep -m1 '^  attend' $OUT/profile.$co.$oh.txt)"
  done
done
unset KIVI_CUDA_CARVEOUT
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw --format=csv -lms 200 > $OUT/clocks.csv &
SMI=$!
for co in none 100; do
  for oh in 1 0; do
    if [ $co = none ]; then unset KIVI_CUDA_CARVEOUT; else export KIVI_CUDA_CARVEOUT=$co; fi
    echo "$(date +%T.%N) start carveout=$co one_head=$oh" >> $OUT/clocks.csv
    KIVI_CUDA_ONE_HEAD=$oh timeout 60 $K bench model --device cuda --random-weights --arch mistral-7b \
      --caches kivi2 --depth 4096,16384 --prompt-tokens 64 --gen-tokens 48 > $OUT/model.$co.$oh.txt 2>&1
    echo "model carveout=$co one_head=$oh rc=$?"; grep '^| kivi' $OUT/model.$co.$oh.txt
  done
done
kill $SMI
# Few files come back from a device call: one per kind.
cd $OUT && tail -n +1 plans.[01].txt > plans.txt && tail -n +1 profile.*.txt > profiles.txt \
  && tail -n +1 model.*.txt > models.txt \
  && for f in attn.*.jsonl; do sed "s/^{/{\"file\":\"$f\",/" $f; done > attention.jsonl \
  && rm -f plans.[01].txt profile.*.txt model.*.txt attn.*.jsonl
