#!/usr/bin/env bash
# SFT throughput and peak memory: `align train sft` vs TRL's SFTTrainer on the same model,
# conversations, sequence length (256), batch (4) and method (full and LoRA r=8 all-linear by
# default; METHODS="full lora dora ia3 prompt_tuning prefix_tuning" for every PEFT method: DoRA
# r=8 all-linear, (IA)³ with PEFT's default modules, 20 virtual tokens), on CPU in f32. Prints
# tokens/s and peak RSS of each and the ratios.
#   [METHODS="…"] benches/sft_vs_trl.sh [MODEL_DIR]   (default .cache/smollm2; needs trl + peft in .venv)
# Tokens/s = sequences/s × mean tokens per sequence (both sides truncate to 256), timed over the
# steps after two warm-up steps. align trains on assistant tokens only, TRL here on all tokens:
# the compute per step is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
data=data/sft/medical_sharegpt.jsonl
steps=12
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
python -c "import trl, peft" 2>/dev/null || pip install -q "trl==1.16.0" "peft==0.21.2"
cargo build --release -p align-cli >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
threads=$(python -c "import torch; print(torch.get_num_threads())")
rss() { grep "Maximum resident set size" "$1" | awk '{print $NF}'; }
printf '%-13s | %12s %12s %7s | %12s %12s %7s\n' method "align tok/s" "trl tok/s" ratio "align MiB" "trl MiB" ratio
for method in ${METHODS:-full lora}; do
  align_method=$method
  [ "$method" = dora ] && align_method=lora
  cat > "$work/sft.toml" <<TOML
model = "$model"
data = ["$data"]
output_dir = "$work/align-$method"
method = "$align_method"
[train]
max_steps = $steps
batch_size = 4
lr = 1e-5
max_length = 256
threads = $threads
save_every = 1000
TOML
  # [lora] only under method = "lora" (a [lora] section with method = "full" is an error)
  case $method in
    lora) printf '[lora]\nr = 8\nalpha = 16\ntargets = "all-linear"\n' >> "$work/sft.toml" ;;
    dora) printf '[lora]\nr = 8\nalpha = 16\ntargets = "all-linear"\nuse_dora = true\n' >> "$work/sft.toml" ;;
    ia3) printf '[ia3]\n' >> "$work/sft.toml" ;;
    prompt_tuning) printf '[prompt_tuning]\nnum_virtual_tokens = 20\n' >> "$work/sft.toml" ;;
    prefix_tuning) printf '[prefix_tuning]\nnum_virtual_tokens = 20\n' >> "$work/sft.toml" ;;
  esac
  /usr/bin/time -v target/release/align train sft --config "$work/sft.toml" --restart 2> "$work/align-$method.time" >/dev/null
  a_tps=$(python - "$work/align-$method/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][2:]
print(sum(r["tokens_per_second"] for r in rows) / len(rows))
PY
)
  /usr/bin/time -v python benches/trl_sft.py --model "$model" --data "$data" --method $method --steps $steps --threads "$threads" --out "$work/trl" > "$work/trl-$method.json" 2> "$work/trl-$method.time"
  # the Trainer prints its own summary first; our JSON is the last line
  t_tps=$(tail -n 1 "$work/trl-$method.json" | python -c "import json,sys;print(json.load(sys.stdin)['tokens_per_second'])")
  a_mem=$(( $(rss "$work/align-$method.time") / 1024 )); t_mem=$(( $(rss "$work/trl-$method.time") / 1024 ))
  python - "$method" "$a_tps" "$t_tps" "$a_mem" "$t_mem" <<'PY'
import sys
m, a, t, am, tm = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"{m:<13} | {a:12.1f} {t:12.1f} {a/t:6.2f}x | {am:12d} {tm:12d} {am/tm:6.2f}x")
PY
done
echo "tokens/s: higher is better; MiB = peak resident memory of the whole process: lower is better (targets: ≥ 1.2× tokens/s, ≤ 0.8× memory)"
