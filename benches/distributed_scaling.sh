#!/usr/bin/env bash
# Data-parallel scaling of `align train sft` on this machine: 1 rank against 2 ranks (c10d Gloo
# over loopback, launched by the venv's torchrun) on the same global batch, full fine-tuning in
# f32, and the peak memory of each rank under ZeRO 0, 1 and 2.
#   benches/distributed_scaling.sh [MODEL_DIR] [STEPS]
#   MODEL_DIR default .cache/smollm2 (make it: ../shared/tools/make-smollm2.sh DIR .venv/bin/python)
#   STEPS default 6 (tokens/s is the summary's tokens / seconds over all of them)
# Prints, for each setting, the median of REPEATS (env, default 3) runs, alternating settings:
#   - 1 rank × 1 thread (the reference a 2-rank job is compared with: scaling efficiency =
#     tokens/s of 2 ranks / (2 × this)), 1 rank × 2 threads (the same cores as the 2-rank job),
#     2 ranks × 1 thread;
#   - the peak RSS of rank 0 and rank 1 with train.zero = 0, 1, 2 (2 ranks; rank 0 gathers the
#     whole optimizer state to write checkpoints, so the saving shows on rank 1).
# On a 2-core machine the 2 ranks share the cores that 1 rank × 2 threads uses: the comparison
# shows the cost of the collectives, not the speed-up of more hardware. On one GPU, N processes
# are not scaling either; run it on N GPUs (NCCL is not built in yet: Gloo through host memory).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
steps=${2:-6}
repeats=${REPEATS:-3}
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
cargo build --release -p align-cli >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

config() { # NAME BATCH THREADS ZERO
  cat > "$work/$1.toml" <<TOML
model = "$model"
data = ["data/sft/medical_sharegpt.jsonl"]
output_dir = "$work/$1"
[train]
max_steps = $steps
batch_size = $2
lr = 1e-5
max_length = 256
threads = $3
zero = $4
save_every = 0
[sft]
TOML
}

# runs NAME WORLD; prints tokens/s and the peak RSS (MiB) of rank 0 and of rank 1 (- for 1 rank)
run() {
  rm -rf "$work/$1"
  if [ "$2" = 1 ]; then
    ALIGN_LOG=warn target/release/align train sft --config "$work/$1.toml" >/dev/null 2>&1
  else
    ALIGN_LOG=info .venv/bin/torchrun --nproc-per-node "$2" --no-python target/release/align train sft \
      --config "$work/$1.toml" >/dev/null 2>"$work/$1.log"
  fi
  python - "$work/$1/train_summary.json" "$work/$1.log" <<'PY'
import json, os, re, sys
s = json.load(open(sys.argv[1]))
rank1 = "-"
if os.path.exists(sys.argv[2]):
    m = re.search(r"rank 1 of \d+: peak memory \(resident\): ([\d.]+) (GiB|MiB)", open(sys.argv[2]).read())
    if m:
        rank1 = f"{float(m.group(1)) * (1024 if m.group(2) == 'GiB' else 1):.0f}"
print(f"{s['tokens_seen'] / s['seconds']:.1f} {s['peak_rss_bytes'] / 2**20:.0f} {rank1}")
PY
}

config one1 4 1 0
config one2 4 2 0
config two0 2 1 0
config two1 2 1 1
config two2 2 1 2
declare -A tps rss rss1
names="one1 one2 two0 two1 two2"
rm -f "$work"/*.log
for r in $(seq "$repeats"); do
  for n in $names; do
    w=1; [ "${n#two}" != "$n" ] && w=2
    read -r t m m1 < <(run "$n" "$w")
    tps[$n]+="$t "
    rss[$n]+="$m "
    rss1[$n]+="$m1 "
    echo "run $r/$repeats $n: $t tok/s, peak rank 0 $m MiB, rank 1 $m1 MiB" >&2
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n%-28s %12s %12s %12s\n' "setting (global batch 4)" "tokens/s" "rank-0 MiB" "rank-1 MiB"
for n in $names; do
  case $n in
    one1) label="1 rank x 1 thread" ;;
    one2) label="1 rank x 2 threads" ;;
    two0) label="2 ranks x 1 thread, zero 0" ;;
    two1) label="2 ranks x 1 thread, zero 1" ;;
    two2) label="2 ranks x 1 thread, zero 2" ;;
  esac
  r1=$(median "${rss1[$n]}"); [ "${n#one}" != "$n" ] && r1=-
  printf '%-28s %12s %12s %12s\n' "$label" "$(median "${tps[$n]}")" "$(median "${rss[$n]}")" "$r1"
done
python - "$(median "${tps[one1]}")" "$(median "${tps[one2]}")" "$(median "${tps[two0]}")" \
  "$(median "${rss1[two0]}")" "$(median "${rss1[two1]}")" "$(median "${rss1[two2]}")" <<'PY'
import sys
one1, one2, two, m0, m1, m2 = map(float, sys.argv[1:])
print(f"\n2 ranks / 1 rank x 1 thread: {two / one1:.2f}x (scaling efficiency {two / (2 * one1) * 100:.0f} %)")
print(f"2 ranks / 1 rank x 2 threads (same cores): {two / one2:.2f}x")
print(f"rank-1 peak memory, zero 1 / zero 0: {m1 / m0:.2f}x; zero 2 / zero 0: {m2 / m0:.2f}x")
print("(rank 0 gathers the whole optimizer state to write checkpoints: its peak holds it all)")
PY
