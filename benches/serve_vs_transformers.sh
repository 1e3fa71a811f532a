#!/usr/bin/env bash
# Serving throughput: `align serve` vs `transformers serve --continuous-batching` (the reference
# that installs on this machine; vLLM's CPU build needs another torch) on the same model, CPU,
# f32, greedy streaming chat with 32 new tokens. At concurrency 1, 8 and 32 (N clients, max(8, 2N)
# requests each round) it prints requests/s, median time to first token and generated tokens/s
# of both and the ratios (align / transformers; for TTFT lower is better). Each row alternates
# which server runs first over ROUNDS rounds (default 2) and reports medians.
#   [ROUNDS=2] [LEVELS="1 8 32"] benches/serve_vs_transformers.sh [MODEL_DIR]   (default .cache/smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model=${1:-.cache/smollm2}
[ -f "$model/config.json" ] || { echo "no model at $model (make one: ../shared/tools/make-smollm2.sh $model .venv/bin/python)" >&2; exit 1; }
python -c "import openai, fastapi, uvicorn" 2>/dev/null || pip install -q "openai==3.57.0" fastapi uvicorn
cargo build --release --workspace --features align-cli/fault-injection >&2
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
wait_up() { for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "server on $1 did not start" >&2; exit 1; }
aport=$(free_port)
target/release/align serve --model "$model" --served-model-name bench --port "$aport" --max-batch 32 --dtype f32 >"$work/align.log" 2>&1 &
pids+=($!)
tport=$(free_port)
# transformers serve lists models from a hub cache: give it an empty one (nothing is downloaded)
mkdir -p "$work/hf-cache"
HF_HUB_CACHE="$work/hf-cache" HF_HUB_OFFLINE=1 transformers serve "$model" --continuous-batching --device cpu --dtype float32 --host 127.0.0.1 --port "$tport" >"$work/hf.log" 2>&1 &
pids+=($!)
wait_up "$aport"; wait_up "$tport"
tmodel=$model  # the model it was started with answers every request
run() { # server port model concurrency requests
  python benches/serve_load.py --base-url "http://127.0.0.1:$1/v1" --model "$2" --tokenizer "$model" --concurrency "$3" --requests "$4" 2>/dev/null
}
printf '%-5s | %9s %9s %6s | %9s %9s %6s | %9s %9s %6s\n' conc "align r/s" "hf r/s" ratio "align tok/s" "hf tok/s" ratio "align ttft" "hf ttft" ratio
for c in ${LEVELS:-1 8 32}; do
  n=$(( 2 * c > 8 ? 2 * c : 8 ))
  : >"$work/a.jsonl"; : >"$work/t.jsonl"
  for r in $(seq 1 "${ROUNDS:-2}"); do
    if [ $((r % 2)) = 1 ]; then
      run "$aport" bench "$c" "$n" >>"$work/a.jsonl"; run "$tport" "$tmodel" "$c" "$n" >>"$work/t.jsonl"
    else
      run "$tport" "$tmodel" "$c" "$n" >>"$work/t.jsonl"; run "$aport" bench "$c" "$n" >>"$work/a.jsonl"
    fi
  done
  python - "$c" "$work/a.jsonl" "$work/t.jsonl" <<'PY'
import json, statistics, sys
c = sys.argv[1]
a = [json.loads(l) for l in open(sys.argv[2])]
t = [json.loads(l) for l in open(sys.argv[3])]
m = lambda rows, k: statistics.median(r[k] for r in rows)
ar, tr = m(a, "requests_per_second"), m(t, "requests_per_second")
at, tt = m(a, "tokens_per_second"), m(t, "tokens_per_second")
af, tf = m(a, "ttft_median"), m(t, "ttft_median")
print(f"{c:<5} | {ar:9.2f} {tr:9.2f} {ar/tr:5.2f}x | {at:9.1f} {tt:9.1f} {at/tt:5.2f}x | {af:8.3f}s {tf:8.3f}s {af/tf:5.2f}x")
PY
done
echo "(ratios: align / transformers serve; CPU threads: $(python -c 'import torch; print(torch.get_num_threads())'); logs in $work until exit)"
