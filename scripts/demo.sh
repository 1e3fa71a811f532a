#!/usr/bin/env bash
# The main job: builds align (setting up .venv with torch when missing) and runs the embedded
# medical demo on CPU: pipelines/medical-demo.toml alone does everything (a byte-level BPE tokenizer
# trained on the project's sample data → random-initialised Llama → pretraining → SFT → reward model
# and its held-out / length-matched accuracy → PPO → evaluation), then prints the status table,
# writes the report and lets the aligned model answer.
# Re-running skips what is done and resumes what was interrupted. PIPELINE=pipelines/medical-demo-dpo.toml
# runs the DPO twin in the same run directory (only its "rlhf" stage and the evaluations re-run).
#   scripts/demo.sh [extra `align run` flags, e.g. --restart]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p align-cli
align=target/release/align
pipeline=${PIPELINE:-pipelines/medical-demo.toml}
step() { printf '\n== %s\n' "$*" >&2; }

step "pipeline: $pipeline"
"$align" run "$pipeline" "$@"

if "$align" status --help >/dev/null 2>&1; then
  step "status"
  "$align" status runs/demo
fi
if "$align" report --help >/dev/null 2>&1; then
  step "report"
  "$align" report runs/demo
fi

step "the aligned model answers (greedy, chat template)"
"$align" generate --model runs/demo/rlhf/final --chat --prompt "What should I do if I have a mild fever?" --max-new-tokens 48
printf '\ndemo finished: runs/demo\n' >&2
