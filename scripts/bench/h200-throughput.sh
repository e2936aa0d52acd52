#!/bin/bash
# The device call behind docs/benchmarks.md "Throughput (H200, Llama-2-7B shapes)": GPU tests,
# the sweep, the breakdown benchmarks, Hugging Face. Expects in $D the `kivi` binary, the stripped
# kivi-cuda test binaries as t_<name> and the two Python scripts of scripts/bench; $OUT for outputs.
D=${D:-.dev/geng}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:$LD_LIBRARY_PATH
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
date
for t in runner model cache kivi_cuda; do echo "== $t"; timeout 120 $D/t_$t --test-threads=1 --nocapture 2>&1 | grep -E "^test |test result|panicked|preemptions|matched|assert" | tail -n 20; done 2>&1 | tee $OUT/tests.log
date
timeout 290 $D/kivi bench throughput --device cuda --random-weights --arch llama2-7b --workload fixed --kv f16,kivi2:r32,kivi2,kivi4 --batch 16,128,256,512 --max-batch 1400 --out $OUT/h200.json --plot $OUT/h200 2>&1 | tee $OUT/h200.log
date
timeout 40 $D/kivi bench attention --device cuda --shapes 32/32/128 --batch 256,1024 --context 330 --caches f16,kivi2:r32,kivi2,kivi4 --reps 5 --inner 5 2>&1 | tail -n 12 | tee $OUT/micro.log
timeout 40 python3 $D/llama_gemms.py --rows 64,256,1024 2>&1 | tee -a $OUT/micro.log
date
timeout 150 python3 $D/hf_throughput.py --batches 256 --caches static --max-seconds 100 --out $OUT/hf.json 2>&1 | grep -v -i warn
date
