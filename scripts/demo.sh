#!/usr/bin/env bash
# The main job on a default that works out of the box: check PneumoniaMNIST, then compare every method
# (baseline, class weighting, traditional and diffusion rebalancing, DiffMIC-v2, D-Cube, diffusion
# classifier) on the same splits with the quick budget, and write runs/demo-*/benchmark.html.
# Rerunning the printed command resumes a killed run. Pass e.g. `--budget full --seeds 3` for the full protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# offline default: the shared data folder beside the repo, else ~/.diffmed/data (downloaded when online)
if [ -z "${DIFFMED_DATA:-}" ] && [ -d ../shared/data ]; then export DIFFMED_DATA=$(cd ../shared/data && pwd); fi
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
diffmed data check --data pneumoniamnist --out "$out/data-check"
exec diffmed benchmark --data pneumoniamnist --budget quick --out "$out" "$@"
