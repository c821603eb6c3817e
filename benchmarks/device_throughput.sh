#!/usr/bin/env bash
# benchmarks/throughput.py on one CUDA GPU (a prepared device check; fits a 15-minute device budget):
# SD3.5-Medium then FLUX.1-dev (random weights from benchmarks/architectures/), 512², 10 steps, CFG, batch 8,
# eager and compiled; the table goes to docs/throughput_<gpu>.md, the JSON beside it, under $OUT.
#   bash benchmarks/device_throughput.sh              # both architectures
#   ARCH=sd35m MODES=eager bash benchmarks/device_throughput.sh   # a quick first look (about a minute)
# Each architecture runs as its own job with its own time limit, so a slow compile of FLUX cannot cost the
# SD3.5 numbers. Copy $OUT/docs/*.md into docs/ and commit them with the GPU's name.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
set -u
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT/docs"
PY=${PY:-python3}; BATCH=${BATCH:-8}; MODES=${MODES:-eager compiled}; ARCH=${ARCH:-sd35m flux_dev}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || exit 1
echo "gpu $GPU"
for a in $ARCH; do
  timeout ${JOB_LIMIT:-330} $PY benchmarks/throughput.py --arch $a --batch $BATCH --modes $MODES \
      --json "$OUT/docs/throughput_${GPU}_$a.json" --markdown "$OUT/docs/throughput_${GPU}_$a.md" \
      > "$OUT/$a.out" 2> "$OUT/$a.err"
  echo "$a rc=$?"; cat "$OUT/$a.out"; tail -5 "$OUT/$a.err"
done
