#!/usr/bin/env bash
# The GPU machine's one check (issue 18): runs the prebuilt release binary — no Rust, no network
# needed — and writes one JSON and one Markdown summary under $OUT.
#
#   scripts/gpu-check.sh                    # on the GPU machine (torch 2.11 with CUDA in python3)
#   GPU_CHECK_DRY=1 scripts/gpu-check.sh    # the same steps on CPU with tiny models (any machine)
#
# Steps, each time-boxed (`timeout`) so that a hang cannot eat the session:
#   1. `align env` sees CUDA;
#   2. CUDA vs CPU: perplexity of the test model in f32 (relative difference ≤ 1e-4), bf16 greedy
#      text next to f32 CPU's (reported, not required to match);
#   3. a small pipeline on CUDA — PT → SFT → RM → PPO, and DPO / GRPO from the same SFT — to
#      completion (tiny test model: correctness, not speed);
#   4. `align bench train` for SFT (seq 2048), DPO, PPO and GRPO on a ~0.5B Qwen2-shaped random
#      model in bf16, and `align bench generate` at batch 1 / 16 / 64 (next to transformers'
#      `generate` when python3 has transformers; otherwise absolute figures only, said so).
# Environment: ALIGN_BIN (default dist/align, then target/release/align), OUT (default
# ./gpu-check-out), GPU_CHECK_DRY=1 (CPU, tiny shapes, a few steps).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
BIN=${ALIGN_BIN:-}
if [ -z "$BIN" ]; then
  for b in dist/align target/release/align; do [ -x "$b" ] && BIN=$ROOT/$b && break; done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || { echo "gpu-check: no align binary (set ALIGN_BIN or build target/release/align)" >&2; exit 2; }
PY=python3
[ "$DRY" = 1 ] && [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python
TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")' 2>/dev/null) || {
  echo "gpu-check: $PY has no torch (needed for libtorch's libraries)" >&2; exit 2; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ "$DRY" = 1 ]; then
  DEV=cpu; BF16=f32; SEQ_SFT=64; SEQ=32; BATCH=2; STEPS=2; NEW=8; GEN_BATCHES=1,4; BENCH_LIMIT=300
  DESC=$OUT/bench-model.toml
  printf 'model_type = "qwen2"\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 512\ntie_word_embeddings = true\n' > "$DESC"
else
  DEV=cuda; BF16=bf16; SEQ_SFT=2048; SEQ=512; BATCH=8; STEPS=5; NEW=128; GEN_BATCHES=1,16,64; BENCH_LIMIT=150
  # Qwen2-0.5B's shape (random weights; the test tokenizer's small vocabulary)
  DESC=$OUT/bench-model.toml
  printf 'model_type = "qwen2"\nhidden_size = 896\nintermediate_size = 4864\nnum_hidden_layers = 24\nnum_attention_heads = 14\nnum_key_value_heads = 2\nmax_position_embeddings = 4096\ntie_word_embeddings = true\n' > "$DESC"
fi
TOK=$ROOT/tests/fixtures/tokenizer
TINY=$ROOT/tests/fixtures/models/tiny-qwen2
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
FAILED=0

# step NAME SECONDS CMD… : runs CMD with a time limit, its output in $OUT/NAME.log; records the outcome
step() {
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs=$((SECONDS - started))
  local status=ok
  [ $rc -eq 0 ] || status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  [ "$status" = ok ] || FAILED=1
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' "$name" "$status" "$rc" "$secs" >> "$RESULTS"
  echo "gpu-check: $name: $status (${secs}s)" >&2
  [ "$status" = ok ]
}

# 1. the binary sees the device
step env 60 "$BIN" env
if [ "$DRY" != 1 ] && ! grep -q "cuda available: true" "$OUT/env.log"; then
  echo '{"step": "cuda_visible", "status": "failed", "rc": 1, "seconds": 0}' >> "$RESULTS"; FAILED=1
  echo "gpu-check: align does not see CUDA (see $OUT/env.log)" >&2
fi

# 2. CUDA against CPU on the same model
step ppl_cpu 120 "$BIN" eval perplexity --model "$TINY" --device cpu --dtype f32 --data tests/fixtures/perplexity.txt --json
step ppl_dev 120 "$BIN" eval perplexity --model "$TINY" --device "$DEV" --dtype f32 --data tests/fixtures/perplexity.txt --json
"$PY" - "$OUT" >> "$RESULTS" <<'EOF' || FAILED=1
import json, sys
out = sys.argv[1]
def ppl(name):
    for line in open(f"{out}/{name}.log"):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)["perplexity"]
    raise SystemExit(f"no perplexity in {name}.log")
a, b = ppl("ppl_cpu"), ppl("ppl_dev")
rel = abs(a - b) / abs(a)
print(json.dumps({"step": "logits_match", "status": "ok" if rel <= 1e-4 else "failed", "cpu": a, "device": b, "relative_difference": rel}))
sys.exit(0 if rel <= 1e-4 else 1)
EOF
step gen_cpu 120 "$BIN" generate --model "$TINY" --device cpu --dtype f32 --prompt "The patient" --max-new-tokens 16 --json
step gen_dev 120 "$BIN" generate --model "$TINY" --device "$DEV" --dtype "$BF16" --prompt "The patient" --max-new-tokens 16 --json

# 3. every stage of a small pipeline on the device
PIPE=$OUT/pipeline.toml
cat > "$PIPE" <<EOF
[pipeline]
name = "gpu-check"
run_dir = "$OUT/pipeline-run"
[defaults]
model = "$TINY"
device = "$DEV"
[defaults.train]
batch_size = 4
lr = 1e-3
max_steps = 3
max_length = 128
[[stage]]
name = "pt"
kind = "pretrain"
data = ["$ROOT/data/pretrain/medical_notes.jsonl"]
[[stage]]
name = "sft"
kind = "sft"
from = "pt"
data = ["$ROOT/data/sft/medical_sharegpt.jsonl"]
[[stage]]
name = "rm"
kind = "reward"
from = "sft"
data = ["$ROOT/data/preference/medical_pairs.jsonl"]
[[stage]]
name = "ppo"
kind = "ppo"
from = "sft"
reward_model = "rm"
data = ["$ROOT/data/prompts/medical_qa.jsonl"]
[stage.ppo]
rollout_batch_size = 4
max_new_tokens = 8
ppo_epochs = 1
[[stage]]
name = "dpo"
kind = "dpo"
from = "sft"
data = ["$ROOT/data/preference/medical_pairs.jsonl"]
[[stage]]
name = "grpo"
kind = "grpo"
from = "sft"
reward_model = "rm"
data = ["$ROOT/data/prompts/medical_qa.jsonl"]
[stage.grpo]
num_generations = 2
generation_batch_size = 4
max_completion_length = 8
EOF
rm -rf "$OUT/pipeline-run"
step pipeline 300 "$BIN" run "$PIPE"

# 4. benchmarks
for stage in sft dpo ppo grpo; do
  seq=$SEQ; [ $stage = sft ] && seq=$SEQ_SFT
  step "bench_$stage" "$BENCH_LIMIT" "$BIN" bench train --init "$DESC" --tokenizer "$TOK" --stage $stage \
    --device "$DEV" --dtype "$BF16" --seq "$seq" --batch "$BATCH" --steps "$STEPS" --new-tokens "$NEW" --json
done
REF=none
if "$PY" -c "import transformers" 2>/dev/null; then REF=$PY; else
  echo "gpu-check: no transformers in $PY: generation figures are align's only" >&2; fi
"$BIN" init --config "$DESC" --tokenizer "$TOK" --out "$OUT/bench-model" --force > "$OUT/init.log" 2>&1 || true
step bench_generate "$BENCH_LIMIT" "$BIN" bench generate --model "$OUT/bench-model" --device "$DEV" --dtype "$BF16" \
  --batch-sizes "$GEN_BATCHES" --prompt-len 64 --new-tokens 64 --repeats 2 --reference-python "$REF" --json

# summary: one JSON and one Markdown file
"$PY" - "$OUT" "$DRY" <<'EOF'
import json, sys, datetime, subprocess
out, dry = sys.argv[1], sys.argv[2] == "1"
steps = [json.loads(l) for l in open(f"{out}/results.jsonl") if l.strip()]
def last_json(name):
    try:
        lines = [l for l in open(f"{out}/{name}.log") if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:
    gpu = None
summary = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "dry_run": dry, "gpu": gpu, "steps": steps,
    "bench_train": {s: last_json(f"bench_{s}") for s in ["sft", "dpo", "ppo", "grpo"]},
    "bench_generate": last_json("bench_generate"),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
md = [f"# gpu-check {summary['date']}", "", f"GPU: {gpu or '-'}{' (dry run on CPU)' if dry else ''}", "",
      "| step | status | seconds |", "| --- | --- | ---: |"]
md += [f"| {s['step']} | {s['status']} | {s.get('seconds', '-')} |" for s in steps]
md += ["", "| bench | tokens/s | step s | forward | backward | optimizer | generation | MFU | peak |",
       "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
for s, r in summary["bench_train"].items():
    if r:
        mfu = f"{r['mfu'] * 100:.1f} %" if r.get("mfu") is not None else "-"
        md.append(f"| {s} seq {r['seq']} batch {r['batch']} | {r['tokens_per_second']:.0f} | {r['step_seconds_median']:.3f} | "
                  f"{r['forward_seconds_median']:.3f} | {r['backward_seconds_median']:.3f} | {r['optimizer_seconds_median']:.3f} | "
                  f"{r['generation_seconds_median']:.3f} | {mfu} | {r['peak_source']} |")
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
exit $FAILED
