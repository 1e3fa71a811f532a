#!/usr/bin/env bash
# PPO iteration benchmark: `align train ppo` vs TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12,
# the last release that ships it) on the same policy (SmolLM2-135M-Instruct), reward model (also the
# critic), prompts and settings, full fine-tuning in f32 on CPU with a fixed thread count. Prints,
# per run and as medians over the runs, the per-iteration mean of each timed part (generation,
# scoring, forward, optimisation, iteration), generation's share of the iteration, rollout tokens/s
# and peak RSS, with align/TRL ratios.
#   benches/ppo_bench.sh [MODEL_DIR]   (default .cache/smollm2)
#   env: REPEATS (3) runs per engine, alternated; ITERATIONS (5) per run, the first is warm-up and not
#        timed; THREADS (torch's default); TRL=0 runs align only.
# Set-up of what is missing: the reward model (`align train reward` from MODEL_DIR on
# data/preference/medical_pairs.jsonl, 8 steps, kept in .cache/ppo-bench-rm) and .venv-trl-ppo
# (trl 1.12.0 without dependencies; torch, transformers, accelerate, datasets come from .venv
# through a .pth file placed after the venv's own site-packages, so its trl wins).
# What is timed on each side: docs/benchmarks.md ("PPO") and benches/trl_ppo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
repeats=${REPEATS:-3}
iterations=${ITERATIONS:-5}
run_trl=${TRL:-1}
prompts=data/prompts/medical_qa.jsonl
rm_dir=.cache/ppo-bench-rm
trl_venv=.venv-trl-ppo
trl_version=1.12.0
# fixed settings (both engines)
rollout=8 micro=4 epochs=1 new_tokens=48 temperature=0.7 kl_coef=0.05 lr=1e-6 seed=42
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
threads=${THREADS:-$(python -c "import torch; print(torch.get_num_threads())")}
cargo build --release -p align-cli >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -f "$rm_dir/final/config.json" ]; then
  echo "training the benchmark's reward model into $rm_dir (one time)" >&2
  cat > "$work/rm.toml" <<TOML
model = "$model"
data = ["data/preference/medical_pairs.jsonl"]
output_dir = "$rm_dir"
[train]
max_steps = 8
batch_size = 4
lr = 1e-5
max_length = 256
threads = $threads
TOML
  target/release/align train reward --config "$work/rm.toml" --restart >&2
fi

if [ "$run_trl" = 1 ] && ! "$trl_venv/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '$trl_version')" 2>/dev/null; then
  echo "setting up $trl_venv with trl==$trl_version (one time)" >&2
  base=$(python -c "import sys; print(sys._base_executable)")
  "$base" -m venv "$trl_venv"
  "$trl_venv/bin/pip" install -q --disable-pip-version-check --no-deps "trl==$trl_version" >&2
  site=$("$trl_venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  python -c "import site; print(site.getsitepackages()[0])" > "$site/zz_align_venv.pth"
fi
if [ "$run_trl" = 1 ]; then
  "$trl_venv/bin/python" -c "import torch, transformers, trl; print(f'TRL side: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')" >&2
fi

cat > "$work/ppo.toml" <<TOML
model = "$model"
data = ["$prompts"]
output_dir = "$work/align"
[train]
max_steps = $iterations
batch_size = $micro
lr = $lr
schedule = "constant"
max_length = 256
threads = $threads
seed = $seed
[ppo]
reward_model = "$rm_dir/final"
rollout_batch_size = $rollout
mini_batch_size = $rollout
ppo_epochs = $epochs
max_new_tokens = $new_tokens
temperature = $temperature
kl_coef = $kl_coef
sample_every = 0
TOML

run_align() {
  /usr/bin/time -v target/release/align train ppo --config "$work/ppo.toml" --restart 2> "$work/align-$1.time" >/dev/null \
    || { tail -n 30 "$work/align-$1.time" >&2; exit 1; }
  python benches/ppo_summary.py align "$work/align/metrics.jsonl" "$work/align-$1.time" "$1" 1 >> "$work/runs.jsonl"
}
run_trl() {
  /usr/bin/time -v "$trl_venv/bin/python" benches/trl_ppo.py --policy "$model" --reward-model "$rm_dir/final" \
    --prompts "$prompts" --iterations "$iterations" --rollout-batch-size $rollout --batch-size $micro \
    --ppo-epochs $epochs --max-new-tokens $new_tokens --temperature $temperature --kl-coef $kl_coef --lr $lr \
    --seed $seed --threads "$threads" --out "$work/trl" > "$work/trl-$1.out" 2> "$work/trl-$1.time" \
    || { tail -n 30 "$work/trl-$1.time" >&2; exit 1; }
  python benches/ppo_summary.py trl "$work/trl-$1.out" "$work/trl-$1.time" "$1" 1 >> "$work/runs.jsonl"
}

echo "settings: rollout_batch_size $rollout, micro-batch $micro, one minibatch of $rollout, ppo_epochs $epochs, max_new_tokens $new_tokens, temperature $temperature, kl_coef $kl_coef, $iterations iterations (first untimed), f32, $threads threads"
for rep in $(seq 1 "$repeats"); do
  # alternate which engine goes first, so slow phases of the shared machine hit both
  if [ "$run_trl" = 1 ] && [ $((rep % 2)) = 0 ]; then run_trl "$rep"; run_align "$rep"
  elif [ "$run_trl" = 1 ]; then run_align "$rep"; run_trl "$rep"
  else run_align "$rep"; fi
  # the finished runs' lines, so an interrupted benchmark still leaves its figures in the log
  echo "run $rep done (load average $(cut -d' ' -f1-3 /proc/loadavg)):" >&2
  tail -n "$([ "$run_trl" = 1 ] && echo 2 || echo 1)" "$work/runs.jsonl" >&2
done
python benches/ppo_summary.py table "$work/runs.jsonl"
