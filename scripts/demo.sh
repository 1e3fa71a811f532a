#!/usr/bin/env bash
# The main job: builds align (setting up .venv with torch when missing) and runs the embedded
# demo in RUN_DIR (default runs/demo): train a byte-level BPE tokenizer on the project's medical
# sample data, initialise a small Llama-shaped model, measure its perplexity, generate with the
# chat template, and benchmark generation. (The training stages PT → SFT → RM → PPO/DPO join
# this demo as they land; see README "Status".)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release -p align-cli
align=target/release/align
run=${RUN_DIR:-runs/demo}
mkdir -p "$run"
step() { printf '\n== %s\n' "$*" >&2; }

step "1. tokenizer: byte-level BPE with a ChatML template"
"$align" tokenizer train --vocab-size 2048 --out "$run/tokenizer" \
  data/pretrain/medical_corpus.txt data/pretrain/medical_notes.jsonl data/sft/medical_sharegpt.jsonl

step "2. model: random-initialised Llama (pipelines/models/demo-llama.toml)"
"$align" init --config pipelines/models/demo-llama.toml --tokenizer "$run/tokenizer" --out "$run/init"

step "3. perplexity of the untrained model (≈ vocabulary size: it knows nothing yet)"
"$align" eval perplexity --model "$run/init" --data data/pretrain/medical_notes.jsonl --max-length 256

step "4. chat generation (an untrained model answers with noise)"
"$align" generate --model "$run/init" --chat --system "You are a careful medical assistant." \
  --prompt "What should I do if I have a mild fever?" --max-new-tokens 24 --temperature 0.7 --top-p 0.9 --seed 1 --json

step "5. generation throughput, batch 1 and 16"
"$align" bench generate --model "$run/init" --batch-sizes 1,16 --prompt-len 32 --new-tokens 32 --repeats 1 --reference-python none

printf '\ndemo finished: outputs in %s\n' "$run" >&2
