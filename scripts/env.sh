# Sourced by the other scripts: creates .venv with the pinned torch when it is missing and
# exports what torch-sys needs to find libtorch. Safe to source more than once.
ALIGN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=2.11.0
if ! "$ALIGN_ROOT/.venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setting up .venv with torch==$TORCH_VERSION (one time, ~2 minutes)" >&2
  python3 -m venv "$ALIGN_ROOT/.venv"
  "$ALIGN_ROOT/.venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi
export VIRTUAL_ENV="$ALIGN_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset LIBTORCH LIBTORCH_INCLUDE LIBTORCH_LIB
