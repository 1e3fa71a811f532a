#!/usr/bin/env bash
# Multiple-choice evaluation speed: `align eval choice` vs lm-evaluation-harness (HF backend,
# batch size 8 both) on the same model and the same items, CPU, f32. The items are N synthetic
# MMLU-layout questions (seeded) scored 5-shot with the mmlu template; each run is the whole
# command (model load included). Runs alternate which tool goes first over ROUNDS rounds
# (default 3); it prints the median seconds and items/s of both, the ratio (align / lm-eval), and
# the largest per-option log-likelihood difference between the two.
#   [ROUNDS=3] [ITEMS=64] benches/choice_vs_lm_eval.sh [MODEL_DIR]   (default .cache/smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
python -c "import lm_eval" 2>/dev/null || pip install -q "lm-eval==0.4.13"
cargo build --release --workspace --features align-cli/fault-injection >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work" "${ITEMS:-64}" <<'PY'
import json, random, sys
work, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
organs = ["heart", "liver", "kidney", "lung", "pancreas", "spleen", "stomach", "brain", "skin", "thyroid"]
roles = ["filters blood", "produces insulin", "pumps blood", "exchanges gases", "stores bile", "regulates metabolism"]
def item():
    o = rng.sample(organs, 4)
    return {"question": f"Which organ most directly {rng.choice(roles)} in a patient aged {rng.randint(20, 90)}?",
            "subject": "anatomy", "choices": [x.capitalize() for x in o], "answer": rng.randrange(4)}
for name, k in [("anatomy_test.jsonl", n), ("anatomy_dev.jsonl", 5)]:
    with open(f"{work}/{name}", "w") as f:
        for _ in range(k):
            f.write(json.dumps(item()) + "\n")
PY
a=(); l=()
for r in $(seq 1 "${ROUNDS:-3}"); do
  run_align() { local s=$(date +%s.%N); target/release/align eval choice --model "$model" --data "$work/anatomy_test.jsonl" --dev "$work/anatomy_dev.jsonl" --shots 5 --batch-size 8 --output "$work/align.jsonl" >/dev/null 2>&1; a+=($(python -c "import time;print(time.time()-$s)")); }
  run_lm() { local s=$(date +%s.%N); python tests/reference/lm_eval_choice.py --model "$model" --template mmlu --subject anatomy --data "$work/anatomy_test.jsonl" --dev "$work/anatomy_dev.jsonl" --shots 5 --batch-size 8 --out "$work/lm.json" >/dev/null 2>&1; l+=($(python -c "import time;print(time.time()-$s)")); }
  if [ $((r % 2)) = 1 ]; then run_align; run_lm; else run_lm; run_align; fi
done
python - "$work" "${ITEMS:-64}" "${a[*]}" "${l[*]}" <<'PY'
import json, statistics, sys
work, n = sys.argv[1], int(sys.argv[2])
a = statistics.median(map(float, sys.argv[3].split())); l = statistics.median(map(float, sys.argv[4].split()))
ours = [json.loads(x) for x in open(f"{work}/align.jsonl")]
ref = json.load(open(f"{work}/lm.json"))["items"]
diff = max(abs(p - q) for o, r in zip(ours, ref) for p, q in zip(o["loglikelihoods"], r["loglikelihoods"]))
acc_a = sum(o["acc"] for o in ours) / len(ours); acc_l = sum(r["acc"] for r in ref) / len(ref)
print(f"{n} items, 5-shot mmlu, batch 8, median of {len(sys.argv[3].split())} runs (model load included)")
print(f"{'':10} {'seconds':>9} {'items/s':>9}")
print(f"{'align':10} {a:9.2f} {n / a:9.2f}")
print(f"{'lm-eval':10} {l:9.2f} {n / l:9.2f}")
print(f"ratio (align / lm-eval items/s): {l / a:.2f}x; acc {acc_a:.4f} vs {acc_l:.4f}; max |Δ loglikelihood| {diff:.2e}")
PY
