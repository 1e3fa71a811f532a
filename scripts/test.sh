#!/usr/bin/env bash
# The test command: sets up what is missing (.venv with torch, transformers for the interop
# checks), builds the workspace in release mode and runs every test.
#   scripts/test.sh [extra cargo test args]
# Real-model checks run too when ALIGN_SMOLLM2_DIR points to a SmolLM2 folder
# (make one with ../shared/tools/make-smollm2.sh DIR .venv/bin/python).
# The suite passes on any x86-64 or ARM CPU; to check libtorch's portable (non-vectorised) kernels
# on this machine, run it once as `ATEN_CPU_CAPABILITY=default scripts/test.sh` (not run twice here:
# CI time is limited).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if ! python -c "import transformers" 2>/dev/null; then
  echo "installing transformers into .venv (used only by tests and benchmarks)" >&2
  pip install -q --disable-pip-version-check "transformers==5.23.0" >&2
fi
# the kill/crash tests need align-core's test hooks (a build feature: never in the binary users run)
cargo build --release --workspace --features align-cli/fault-injection
cargo test --release --workspace --features align-cli/fault-injection --no-fail-fast "$@"
