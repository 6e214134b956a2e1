#!/usr/bin/env bash
# The main job on a default that works out of the box: check PneumoniaMNIST, train a ResNet-18
# baseline, evaluate it with confidence intervals and write a report (runs/quickstart-*/report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# offline default: the shared data folder beside the repo, else ~/.diffmed/data (downloaded when online)
if [ -z "${DIFFMED_DATA:-}" ] && [ -d ../shared/data ]; then export DIFFMED_DATA=$(cd ../shared/data && pwd); fi
exec diffmed quickstart --out "runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
