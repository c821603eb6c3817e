#!/usr/bin/env bash
# The pocket world on one CUDA GPU: noise-optimization sweeps (all 384 held-out prompts) and Flow-GRPO
# with larger rollout batches, run side by side (the pocket models are tiny; the GPU is launch-bound).
#   MODE=smoke bash benchmarks/device_pocket.sh      # a minute: timings of one unit of each job
#   MODE=full  bash benchmarks/device_pocket.sh      # the sweeps
#   MODE=round3 bash benchmarks/device_pocket.sh    # CARINOX and Flow-GRPO variants at 1024 images/iteration
#   MODE=main  bash benchmarks/device_pocket.sh      # the README's main job (nft.yaml): seed 0 alone (its GPU
#                                                   # wall time; target <= 2 min of training), then seeds 1, 2 side by side
# Results land in ${OUT:-/tmp/device_out}/results.txt (one JSON summary per job) and logs.txt.
# Needs diffusers, open_clip_torch, omegaconf (carried as wheels on the device machine).
# Measured on an H100 (2026-11-27): docs/device_h100_pocket.json, summarised in the README. Thirteen
# jobs at once filled the 80 GB (the noise-optimization jobs at --batch-size 384 hold ~10 GB each):
# three of them ran out of memory, hence --batch-size 192 and expandable segments below.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
set -u
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"; R=/tmp/device_res; rm -rf $R; mkdir -p $R
DEV=${DEV:-cuda}; MODE=${MODE:-smoke}; PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
$PY -c "import torch, flowalign, diffusers, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
NO="$PY benchmarks/noise_opt_pocket.py --device $DEV --seed 0 --carinox-seeds 0"
GR="$PY -m flowalign train configs/pocket/flow_grpo.yaml model.device=$DEV train.mixed_precision=fp32 eval.prompts=prompts/pocket/test.jsonl eval.batch_size=384 run.tracker=none run.save_every=1000"
job() { local name=$1; shift; ( timeout ${JOB_LIMIT:-400} /usr/bin/time -f "$name wall %e s" "$@" > $R/$name.out 2> $R/$name.err; echo "$name rc=$?" >> $R/rc ) & }
if [ "$MODE" = smoke ]; then
  job n_smoke $NO --batch-size 384 --limit-per-category ${LPC:-64} --iterations 3 --reward-views 4 --methods reno,best_of_n
  job g_smoke $GR run.output_dir=/tmp/g_smoke train.num_iterations=2 train.prompts_per_iteration=64 train.micro_batch_size=256 eval.every=2
  job g_bf16 $GR run.output_dir=/tmp/g_bf16 train.num_iterations=1 train.mixed_precision=bf16 eval.every=1
elif [ "$MODE" = main ]; then
  MJ="$PY benchmarks/grpo_pocket.py --config configs/pocket/nft.yaml"
  job main_s0 $MJ --out $OUT/main_s0 model.device=$DEV run.seed=0 eval.every=10; wait
  job main_s1 $MJ --out $OUT/main_s1 model.device=$DEV run.seed=1 eval.every=10
  job main_s2 $MJ --out $OUT/main_s2 model.device=$DEV run.seed=2 eval.every=10
elif [ "$MODE" = round3 ]; then
  job n_car10_s0 $NO --batch-size 192 --reward-views 4 --methods carinox --carinox-seeds 10
  job n_car10_lr05_s0 $NO --batch-size 192 --reward-views 4 --lr 0.05 --methods carinox --carinox-seeds 10
  job n_car10_lr05_s1 $NO --batch-size 192 --reward-views 4 --lr 0.05 --methods carinox --carinox-seeds 10 --seed 1
  job n_reno4_lr05_s1 $NO --batch-size 192 --reward-views 4 --lr 0.05 --methods reno --seed 1
  B="train.num_iterations=60 train.prompts_per_iteration=64 train.micro_batch_size=128 eval.every=20"
  job g_b1024_lr3e3_clip1e2 $GR run.output_dir=/tmp/g_a $B train.lr=3e-3 train.clip_range=1e-2
  job g_b1024_win8 $GR run.output_dir=/tmp/g_b $B sampling.window_size=8
  job g_b1024_kl0_clip1e2 $GR run.output_dir=/tmp/g_c $B train.kl_beta=0 train.clip_range=1e-2
  job g_b1024_noise1_clip1e2 $GR run.output_dir=/tmp/g_d $B sampling.noise_level=1.0 train.clip_range=1e-2
  job g_b1024_stdgroup_clip1e2 $GR run.output_dir=/tmp/g_e $B train.std_mode=per_prompt train.clip_range=1e-2
else
  job n_bon4 $NO --batch-size 192 --reward-views 4 --methods best_of_n
  job n_reno4 $NO --batch-size 192 --reward-views 4 --methods reno
  job n_reno8 $NO --batch-size 192 --reward-views 8 --methods reno,best_of_n
  job n_reno4_lr05 $NO --batch-size 192 --reward-views 4 --lr 0.05 --methods reno
  job n_reno4_shift3 $NO --batch-size 192 --reward-views 4 --view-shift 3 --methods reno,best_of_n
  job n_reno4_it100 $NO --batch-size 192 --reward-views 4 --iterations 100 --methods reno,best_of_n
  job n_reno4_reg01 $NO --batch-size 192 --reward-views 4 --reg-weight 0.1 --methods reno
  job n_reno4_s1 $NO --batch-size 192 --reward-views 4 --methods reno,best_of_n --seed 1
  job n_reno4_lr02 $NO --batch-size 192 --reward-views 4 --lr 0.2 --methods reno
  job g_base128 $GR run.output_dir=/tmp/g_base128 train.num_iterations=100 eval.every=20
  job g_b1024 $GR run.output_dir=/tmp/g_b1024 train.num_iterations=60 train.prompts_per_iteration=64 train.micro_batch_size=256 eval.every=20
  job g_b1024_lr3e4 $GR run.output_dir=/tmp/g_b1024_lr3e4 train.num_iterations=60 train.prompts_per_iteration=64 train.micro_batch_size=256 train.lr=3e-4 eval.every=20
  job g_b2048 $GR run.output_dir=/tmp/g_b2048 train.num_iterations=40 train.prompts_per_iteration=128 train.micro_batch_size=256 eval.every=20
fi
wait
for f in $R/*.out; do n=$(basename $f .out); echo "=== $n"; cat $f; done > $OUT/results.txt
for d in /tmp/g_*; do [ -f $d/metrics.jsonl ] && { echo "=== $d"; grep -E '"eval/' $d/metrics.jsonl | head -20; grep -c . $d/metrics.jsonl; }; done >> $OUT/results.txt
for f in $R/*.err; do echo "=== $f"; tail -c 3000 $f; done > $OUT/logs.txt; cat $R/rc >> $OUT/logs.txt
cat $R/rc; grep -h "wall" $R/*.err
