#!/usr/bin/env bash
# DPO throughput and peak memory: `align train dpo` vs TRL's DPOTrainer on the same model, pairs,
# max length (256), batch (4 pairs per step), steps (10), lr (5e-7, linear), β (0.1) and sigmoid
# loss, full fine-tuning, f32 on CPU, same thread count; reference live (a second frozen copy of
# the model) and precomputed (scored once before training, not held in memory). Prints pairs/s and
# peak RSS of each and the ratios align / TRL.
#   benches/dpo_vs_trl.sh [MODEL_DIR]   (default $ALIGN_BENCH_MODEL or .cache/smollm2)
#   REPEATS=3 benches/dpo_vs_trl.sh     runs align and TRL alternately REPEATS times, reports medians
# Both engines train one epoch over the first steps × batch pairs of the data file. Pairs/s = pairs
# of the steps after two warm-up steps ÷ wall time from the end of step 2 to the end of the last
# step (align: the timestamps of its per-step log lines; TRL: an on_step_end callback). Model
# loading, tokenisation and the precompute pass are outside that window; the precompute pass is
# shown on its own ("ref pass s"; align's includes loading the reference model, TRL scores with
# the already loaded policy). Peak RSS = the whole process, from `/usr/bin/time -v`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-${ALIGN_BENCH_MODEL:-.cache/smollm2}}
repeats=${REPEATS:-1}
steps=10 batch=4 max_length=256 lr=5e-7 beta=0.1
if [ ! -f "$model/config.json" ]; then
  echo "skipped: no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2
  exit 0
fi
python -c "import trl, transformers, datasets" 2>/dev/null || pip install -q "trl==1.16.0" "transformers==5.23.0" "datasets==5.2.0"
cargo build --release -p align-cli >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
threads=$(python -c "import torch; print(torch.get_num_threads())")
head -n $((steps * batch)) data/preference/medical_pairs.jsonl > "$work/pairs.jsonl"
cat > "$work/dpo.toml" <<TOML
model = "$model"
data = ["$work/pairs.jsonl"]
output_dir = "$work/align"
method = "full"
[train]
max_steps = $steps
batch_size = $batch
lr = $lr
schedule = "linear"
max_length = $max_length
threads = $threads
log_every = 1
[dpo]
beta = $beta
loss = "sigmoid"
TOML
rss() { grep "Maximum resident set size" "$1" | awk '{print $NF}'; }

# align: pairs/s and the reference pass from the timestamps of its log lines
align_run() { # mode rep
  local out="$work/align-$1-$2"
  /usr/bin/time -v -o "$out.time" target/release/align train dpo --config "$work/dpo.toml" --restart \
    --set "output_dir=\"$out\"" --set "dpo.precompute_ref=$([ "$1" = precomputed ] && echo true || echo false)" \
    > /dev/null 2> "$out.log"
  python - "$out.log" "$steps" "$batch" "$(rss "$out.time")" <<'PY'
import json, re, sys
from datetime import datetime
log, steps, batch, rss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
at = lambda line: datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
ends, ref = {}, []
for line in open(log):
    m = re.search(r" step (\d+)/\d+ loss", line)
    if m:
        ends[int(m.group(1))] = at(line)
    elif "computing reference log-probs" in line or "reference log-probs cached in" in line:
        ref.append(at(line))
secs = ends[steps] - ends[2]
print(json.dumps({"pairs_per_second": (steps - 2) * batch / secs, "ref_pass_seconds": ref[1] - ref[0] if len(ref) == 2 else None, "rss_kib": rss}))
PY
}

trl_run() { # mode rep
  local out="$work/trl-$1-$2"
  /usr/bin/time -v -o "$out.time" python benches/trl_dpo.py --model "$model" --data "$work/pairs.jsonl" \
    --reference "$1" --max-length $max_length --batch-size $batch --steps $steps --lr $lr --beta $beta \
    --threads "$threads" --out "$work/trl" > "$out.json" 2> "$out.log"
  # the Trainer prints its own summary first; our JSON is the last line
  tail -n 1 "$out.json" | python -c "import json,sys; r=json.load(sys.stdin); r['rss_kib']=int(sys.argv[1]); print(json.dumps(r))" "$(rss "$out.time")"
}

: > "$work/runs.jsonl"
for rep in $(seq "$repeats"); do
  for mode in live precomputed; do
    for engine in align trl; do
      r=$(${engine}_run "$mode" "$rep")
      echo "run $rep $engine $mode: $r" >&2
      echo "{\"engine\": \"$engine\", \"mode\": \"$mode\", \"run\": $r}" >> "$work/runs.jsonl"
    done
  done
done

python - "$work/runs.jsonl" "$threads" "$repeats" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda e, m, k: statistics.median(r["run"][k] for r in rows if r["engine"] == e and r["mode"] == m)
print(f"threads {sys.argv[2]}, medians of {sys.argv[3]} run(s) each")
print(f"{'mode':<11} | {'align pairs/s':>13} {'trl pairs/s':>11} {'ratio':>7} | {'align MiB':>9} {'trl MiB':>8} {'ratio':>7} | {'align ref pass s':>16} {'trl ref pass s':>14}")
for m in ("live", "precomputed"):
    a, t = med("align", m, "pairs_per_second"), med("trl", m, "pairs_per_second")
    am, tm = med("align", m, "rss_kib") / 1024, med("trl", m, "rss_kib") / 1024
    ap = f"{med('align', m, 'ref_pass_seconds'):16.1f}" if m == "precomputed" else f"{'-':>16}"
    tp = f"{med('trl', m, 'ref_pass_seconds'):14.1f}" if m == "precomputed" else f"{'-':>14}"
    print(f"{m:<11} | {a:13.3f} {t:11.3f} {a/t:6.2f}x | {am:9.0f} {tm:8.0f} {am/tm:6.2f}x | {ap} {tp}")
PY
echo "pairs/s: higher is better (target ≥ 1.3× TRL); MiB = peak resident memory of the whole process: lower is better"
