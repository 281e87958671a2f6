#!/usr/bin/env bash
# Install pcd and its dependencies into the virtual environment VENV (default .venv), keeping the torch
# the environment already has (a CUDA build on a GPU machine), or the CPU wheel where that is what the
# machine offers. A constraints file pins that torch, so nothing later swaps it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_DEFAULT=${PCD_TORCH:-2.13.0}

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
fi
PY=$VENV/bin/python

# open3d's wheel links libusb-1.0 even headless; install the system library when we can.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing libusb-1.0-0 (needed by open3d)"
    (apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libusb-1.0-0; }) >/dev/null
  else
    echo "warning: libusb-1.0.so.0 not found; open3d will not import until you install libusb-1.0-0" >&2
  fi
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "installing torch==$TORCH_DEFAULT"
  "$PY" -m pip install -q "torch==$TORCH_DEFAULT" numpy 2>&1 | { grep -v "is ignored: it is neither" || true; }
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
echo "keeping torch $TORCH_VERSION (pinned in $VENV/constraints.txt)"
PIP_CONSTRAINT="$VENV/constraints.txt" "$PY" -m pip install -q -e ".[test]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
"$PY" -c 'import pcd.cli' || { echo "pcd failed to import after install" >&2; exit 1; }
"$PY" -c 'import torch, sys; v=torch.__version__; sys.exit(0 if v == sys.argv[1] else f"torch changed to {v}")' "$TORCH_VERSION"
