#!/usr/bin/env bash
# Creates or updates the project's virtualenv so every other command can trust it.
#
#   bash scripts/setup_env.sh          # ensure .venv is complete (fast no-op when it already is)
#   MCSSL_VENV=/path/to/venv ...       # use another location
#   MCSSL_TORCH_SPEC="torch==X torchvision==Y" ...   # bring another torch build (e.g. for a GPU)
#
# The venv is marked ready (a stamp file) only after every step succeeded, so a failed or
# interrupted set-up is never trusted: the next run repeats the missing steps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MCSSL_VENV:-$ROOT/.venv}"
STAMP="$VENV/.mcssl-ready"
PYTHON="${PYTHON:-python3}"

# torch/torchvision builds this platform provides (pip takes them from local disk here).
if [ -z "${MCSSL_TORCH_SPEC:-}" ]; then
  case "$(uname -m)" in
    aarch64|arm64) MCSSL_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
    *)             MCSSL_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
  esac
fi

want_stamp() {
  { cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/install_detectron2.py"
    echo "$MCSSL_TORCH_SPEC"; } | sha256sum | cut -d' ' -f1
}

fail() {
  echo >&2
  echo "set-up failed: $1" >&2
  echo "The environment at $VENV is NOT marked ready; fix the cause above and rerun the same command." >&2
  exit 1
}

WANT="$(want_stamp)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
rm -f "$STAMP"

echo "[setup] preparing the project environment in $VENV (first run only; a few minutes)" >&2
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || fail "no '$PYTHON' on PATH: install Python >= 3.10 or set PYTHON=/path/to/python3"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PYTHON is older than 3.10; set PYTHON=/path/to/python3.10+"
  "$PYTHON" -m venv "$VENV" || fail "could not create a virtualenv at $VENV (is the python venv module installed?)"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

if "$VPY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "[setup] torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed; keeping it" >&2
else
  echo "[setup] installing $MCSSL_TORCH_SPEC" >&2
  # shellcheck disable=SC2086
  "${PIP[@]}" $MCSSL_TORCH_SPEC \
    || fail "could not install '$MCSSL_TORCH_SPEC' (no access to the package registry, or no such build for this platform)"
fi

echo "[setup] installing the project and its dependencies" >&2
"${PIP[@]}" "setuptools>=64,<81" wheel \
  || fail "could not install setuptools/wheel from the package registry (network access?)"
"${PIP[@]}" --no-build-isolation -e "$ROOT[test]" \
  || fail "could not install the project's dependencies from the package registry (network access?)"

echo "[setup] checking detectron2" >&2
"$VPY" "$ROOT/scripts/install_detectron2.py" || fail "detectron2 is not usable (see the message above)"

"$VPY" -c 'import transfer.d2compat as c; c.import_detectron2(); import pretrain, transfer' \
  || fail "the installed packages do not import"

echo "$WANT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
echo "[setup] environment ready: $VPY" >&2
