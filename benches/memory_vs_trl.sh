#!/usr/bin/env bash
# Peak memory and throughput of `align train sft` vs TRL's SFTTrainer at sequence length 1024,
# batch 4, on CPU in f32, for full tuning, LoRA (r=8, all-linear), LoRA + gradient
# checkpointing (TRL with gradient_checkpointing=True) and QLoRA (a 4-bit NF4 base with double
# quantisation; TRL with bitsandbytes' 4-bit, where it runs on this CPU). Both sides train on the
# same long conversations (medical dialogues joined until each is longer than 1024 tokens, then
# truncated to 1024), so every row is a full-length sequence. align runs with its chunked loss
# (train.loss_chunk_tokens = 1024), TRL as it comes. Prints peak RSS and tokens/s of each, and
# the ratios; runs alternate (align, TRL) row by row.
#   benches/memory_vs_trl.sh [MODEL_DIR] [ROWS]
#   MODEL_DIR default .cache/smollm2 (make it: ../shared/tools/make-smollm2.sh DIR .venv/bin/python)
#   ROWS default "full lora lora+gc qlora"; STEPS (env, default 4: two warm-up, two timed)
# Peak RSS is the whole process (/usr/bin/time -v). Targets (issue 16): memory ≤ 0.6× TRL's in
# every row at ≥ 1.0× its tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
rows=${2:-"full lora lora+gc qlora"}
steps=${STEPS:-4}
seq=1024
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
python -c "import trl, peft" 2>/dev/null || pip install -q "trl==1.16.0" "peft==0.21.2"
cargo build --release -p align-cli >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
threads=$(python -c "import torch; print(torch.get_num_threads())")
python - data/sft/medical_sharegpt.jsonl "$work/long.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
out, turns, chars = [], [], 0
for r in recs * 4:
    dialogue = [t for t in r["conversations"] if t["from"] != "system"]
    turns += dialogue
    chars += sum(len(t["value"]) for t in dialogue)
    if chars > 7000:  # ~1700 tokens: longer than 1024 with any tokenizer of this family
        out.append({"conversations": turns})
        turns, chars = [], 0
    if len(out) == 64:
        break
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
PY
data=$work/long.jsonl
rss() { grep "Maximum resident set size" "$1" | awk '{print $NF}'; }
printf '%-8s | %10s %10s %6s | %10s %10s %6s\n' row "align tok/s" "trl tok/s" ratio "align MiB" "trl MiB" ratio
for row in $rows; do
  method=${row%+gc}; gc=false; [ "$row" != "$method" ] && gc=true
  align_method=$method; [ "$method" = qlora ] && align_method=lora
  cat > "$work/sft.toml" <<TOML
model = "$model"
data = ["$data"]
output_dir = "$work/align-$row"
method = "$align_method"
[train]
max_steps = $steps
batch_size = 4
lr = 1e-5
max_length = $seq
threads = $threads
save_every = 1000
val_ratio = 0.0
loss_chunk_tokens = 1024
TOML
  $gc && echo "gradient_checkpointing = true" >> "$work/sft.toml"
  [ "$method" = qlora ] && printf 'quantize = "nf4"\ndouble_quant = true\n' >> "$work/sft.toml"
  if [ "$align_method" = lora ]; then
    printf '[lora]\nr = 8\nalpha = 16\ndropout = 0.05\ntargets = "all-linear"\n' >> "$work/sft.toml"
  fi
  a_tps=nan; a_mem=0
  if /usr/bin/time -v target/release/align train sft --config "$work/sft.toml" --restart 2> "$work/align-$row.time" >/dev/null; then
    a_tps=$(python - "$work/align-$row/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][2:] or [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print(sum(r["tokens_per_second"] for r in rows) / len(rows))
PY
)
    a_mem=$(( $(rss "$work/align-$row.time") / 1024 ))
  else
    echo "align $row failed: $(grep -v '^\s' "$work/align-$row.time" | tail -n 3)" >&2
  fi
  t_tps=nan; t_mem=0
  gcflag=(); $gc && gcflag=(--gradient-checkpointing)
  if /usr/bin/time -v python benches/trl_sft.py --model "$model" --data "$data" --method "$method" "${gcflag[@]}" \
       --max-length $seq --steps "$steps" --threads "$threads" --out "$work/trl" > "$work/trl-$row.json" 2> "$work/trl-$row.time"; then
    t_tps=$(tail -n 1 "$work/trl-$row.json" | python -c "import json,sys;print(json.load(sys.stdin)['tokens_per_second'])")
    t_mem=$(( $(rss "$work/trl-$row.time") / 1024 ))
  else
    echo "TRL $row did not run here: $(grep -E 'Error|error' "$work/trl-$row.time" | tail -n 1)" >&2
  fi
  python - "$row" "$a_tps" "$t_tps" "$a_mem" "$t_mem" <<'PY'
import sys
m, a, t, am, tm = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ratio = lambda x, y: f"{x / y:5.2f}x" if y and y == y and x == x and x > 0 else "   n/a"
print(f"{m:<8} | {a:10.1f} {t:10.1f} {ratio(a, t)} | {am:10d} {tm:10d} {ratio(am, tm)}")
PY
done
echo "tokens/s: higher is better; MiB = peak resident memory of the whole process, lower is better (targets: ≤ 0.6× memory at ≥ 1.0× tokens/s)"
