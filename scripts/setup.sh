#!/usr/bin/env bash
# Create .venv and install diffmed with its test tools; does nothing when the install is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.diffmed-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the builds that work with torchvision on this platform (CPU or CUDA)
case "$(uname -m)" in
  aarch64|arm64) python -m pip install -q "torch==2.9.1" "torchvision==0.24.1" ;;
  *) python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" ;;
esac
python -m pip install -q -c scripts/constraints.txt -e ".[test]"
echo "$want" > "$stamp"
