#!/usr/bin/env bash
# The test command: sets up what is missing (.venv with torch; transformers, peft,
# bitsandbytes and gguf for the interop checks), builds the workspace in release mode and runs every
# test. The interop checks (align's folders and adapters loaded by transformers / PEFT /
# bitsandbytes) are required here: with
# ALIGN_REQUIRE_INTEROP=1 (or CI=true) a check whose Python package is missing fails instead of
# skipping (crates/testkit: python_with).
#   scripts/test.sh [extra cargo test args]
# Real-model checks run too when ALIGN_SMOLLM2_DIR points to a SmolLM2 folder
# (make one with ../shared/tools/make-smollm2.sh DIR .venv/bin/python); they are the only checks
# that still skip (saying so) when it is unset.
# The suite passes on any x86-64 or ARM CPU; to check libtorch's portable (non-vectorised) kernels
# on this machine, run it once as `ATEN_CPU_CAPABILITY=default scripts/test.sh` (not run twice here:
# CI time is limited).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# pinned together with torch (scripts/env.sh): peft 0.21.2, the newest release, works with
# transformers 5.23.0 and torch 2.11.0 (its only other needs: accelerate, psutil)
TRANSFORMERS_VERSION=5.23.0
PEFT_VERSION=0.21.2
# bitsandbytes 0.50.2, the newest release, quantises and dequantises 4-bit on CPU with torch 2.11
# (the QLoRA interop checks and the fixtures of tests/fixtures/make_bnb_fixtures.py)
BITSANDBYTES_VERSION=0.50.2
# the official OpenAI client (and the browser driver's websocket client) for the checks of
# `align serve` (tests/reference/check_serve.py, check_console.py)
OPENAI_VERSION=3.57.0
WEBSOCKET_CLIENT_VERSION=1.9.2
# gguf 0.19.0 (gguf-py, llama.cpp's reader of GGUF files): reads back `align export --format gguf`
GGUF_VERSION=0.19.0
# lm-evaluation-harness 0.4.13 (HF backend): the reference of `align eval choice`
# (tests/reference/lm_eval_choice.py; its tasks' YAML is what the prompts are checked against)
LM_EVAL_VERSION=0.4.13
if ! python -c "import transformers" 2>/dev/null; then
  echo "installing transformers into .venv (used only by tests and benchmarks)" >&2
  pip install -q --disable-pip-version-check "transformers==$TRANSFORMERS_VERSION" >&2
fi
if ! python -c "import peft" 2>/dev/null; then
  echo "installing peft into .venv (used only by tests and benchmarks)" >&2
  pip install -q --disable-pip-version-check "peft==$PEFT_VERSION" >&2
fi
if ! python -c "import bitsandbytes" 2>/dev/null; then
  echo "installing bitsandbytes into .venv (used only by tests)" >&2
  pip install -q --disable-pip-version-check "bitsandbytes==$BITSANDBYTES_VERSION" >&2
fi
if ! python -c "import openai, websocket" 2>/dev/null; then
  echo "installing openai and websocket-client into .venv (used only by tests)" >&2
  pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION" "websocket-client==$WEBSOCKET_CLIENT_VERSION" >&2
fi
if ! python -c "import gguf" 2>/dev/null; then
  echo "installing gguf into .venv (used only by tests)" >&2
  pip install -q --disable-pip-version-check "gguf==$GGUF_VERSION" >&2
fi
if ! python -c "import lm_eval" 2>/dev/null; then
  echo "installing lm-eval into .venv (used only by tests)" >&2
  pip install -q --disable-pip-version-check "lm-eval==$LM_EVAL_VERSION" >&2
fi
export ALIGN_REQUIRE_INTEROP=1
# the web console is driven in headless chromium where the machine allows installing it
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (used only by the web console's test)" >&2
  apt-get install -y -qq chromium >/dev/null 2>&1 || echo "could not install chromium; the console's browser check will say it is skipped" >&2
fi
# the fsync check traces a checkpoint write with strace: installed where the machine allows it
if ! command -v strace >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing strace (used only by a test)" >&2
  apt-get install -y -qq strace >/dev/null 2>&1 || echo "could not install strace; its check will say it is skipped" >&2
fi
# the kill/crash tests need align-core's test hooks (a build feature: never in the binary users run)
cargo build --release --workspace --features align-cli/fault-injection
cargo test --release --workspace --features align-cli/fault-injection --no-fail-fast "$@"
