#!/usr/bin/env bash
# Run the test suite in the project environment, setting the environment up first if needed.
#   bash run_tests.sh                 # everything (CI runs exactly this)
#   bash run_tests.sh -k masking -x   # any pytest arguments
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup_env.sh
exec "${MCSSL_VENV:-.venv}/bin/python" -m pytest "$@"
