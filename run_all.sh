#!/usr/bin/env bash
# The main job: the benchmark matrix end to end (pretraining -> conversion -> detection/segmentation ->
# linear evaluation -> the paper's tables). With no arguments it runs the toy preset on the built-in data.
#   bash run_all.sh --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh
exec "${MCSSL_VENV:-.venv}/bin/python" -m transfer.benchmark "$@"
