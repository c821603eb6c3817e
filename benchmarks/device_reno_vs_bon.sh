#!/usr/bin/env bash
# ReNO vs Best-of-N at equal generator calls, paired over many noise seeds: WORKERS processes share one
# CUDA GPU (the pocket models are tiny, so the GPU is launch-bound) and each runs seeds FIRST+w,
# FIRST+w+WORKERS, ... of `noise_opt_pocket.py --methods best_of_n,reno --curve` on all 384 held-out
# prompts (4 views, lr 0.05) until LAUNCH_FOR seconds have passed; runs still going at KILL_AFTER are
# stopped (their seed is dropped). Then benchmarks/paired_gold.py pairs the finished seeds prompt by prompt.
#   bash benchmarks/device_reno_vs_bon.sh                      # on the GPU machine (wheels: see device_pocket.sh)
#   DEV=cpu WORKERS=2 N=2 BATCH=6 EXTRA="--limit-per-category 1 --iterations 3" bash benchmarks/device_reno_vs_bon.sh
# Writes ${OUT:-/tmp/device_out}/paired.txt and nopt_runs.tar.gz (each seed's summary.json and
# per_prompt_strict.json; `tar xzf` it and run paired_gold.py on the folders to redo the table).
# Measured on an H200 (2026-11-27): 14 workers, ~150 s per round of 14 seeds (ReNO 73 s, Best-of-N 38 s of
# wall per seed); two calls (FIRST=10, then FIRST=38 LAUNCH_FOR=200 KILL_AFTER=380) gave 56 seeds, kept in
# docs/device_h200_reno_vs_bon.tar.gz; README's noise-optimization section has the paired table.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD
set -u
OUT=${OUT:-/tmp/device_out}; W=${W:-/tmp/nopt_runs}; rm -rf "$W"; mkdir -p "$OUT" "$W"
DEV=${DEV:-cuda}; PY=${PY:-python3}; WORKERS=${WORKERS:-14}; FIRST=${FIRST:-10}; N=${N:-64}; BATCH=${BATCH:-192}
EXTRA=${EXTRA:-}
STOP_AT=$(( $(date +%s) + ${LAUNCH_FOR:-270} ))
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
worker() {
  local s
  for ((s = FIRST + $1; s < FIRST + N; s += WORKERS)); do
    [ "$(date +%s)" -lt "$STOP_AT" ] || break
    # shellcheck disable=SC2086  # EXTRA is a list of arguments
    $PY benchmarks/noise_opt_pocket.py --device "$DEV" --reward-views 4 --methods best_of_n,reno --curve \
      --batch-size "$BATCH" --seed "$s" --out "$W/nopt_s$s" $EXTRA > "$W/s$s.out" 2> "$W/s$s.err"
    echo "seed $s rc=$? at $(( $(date +%s) - STOP_AT + ${LAUNCH_FOR:-270} )) s" | tee -a "$W/rc"
  done
}
pids=()
for ((w = 0; w < WORKERS; w++)); do worker "$w" & pids+=($!); done
( sleep "${KILL_AFTER:-420}"; pkill -f -- "--out $W/nopt_s" ) & killer=$!  # only this script's runs
wait "${pids[@]}"; kill "$killer" 2>/dev/null
done_dirs=()
for d in "$W"/nopt_s*; do
  grep -q '"reno@' "$d/per_prompt_strict.json" 2>/dev/null && done_dirs+=("$d")
done
echo "${#done_dirs[@]} seeds finished"
{
  for a in reno reno-iterate; do $PY benchmarks/paired_gold.py "${done_dirs[@]}" --a "$a" --b best_of_n; done
  grep -h '"reno"' "$W"/s*.err | head -3
} | tee "$OUT/paired.txt"
tar czf "$OUT/nopt_runs.tar.gz" -C "$W" --exclude='*.png' .
for f in "$W"/s*.err; do echo "== $f"; tail -c 600 "$f"; done > "$OUT/logs.txt"
