#!/usr/bin/env bash
# One GPU run for issue 3's figures: the throughput table with the attention-kernel and
# compile variants, sized for a 10-minute call (no configuration starts after 420 s; each has
# 120 s, compilation included; the required rows run first). Results land in $OUT (or
# ./bench-out): env.txt, throughput.json and the log; the table and the verdict print last.
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "transformers", transformers.__version__)'
} 2>&1 | tee "$out/env.txt"
python3 benchmarks/pretrain_throughput.py --timeout 120 --budget 420 \
  --json "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
