# One image, two entry points: `rnnserve torchserve` (model server) and `rnnserve gateway`.
#   docker build --build-arg VARIANT=cuda -t rnnserve:cuda .    (default; PyPI's torch bundles CUDA 12)
#   docker build --build-arg VARIANT=cpu  -t rnnserve:cpu .
# The .mar archives are built at image build time from the committed weights: nothing is downloaded
# at run time. The GPU comes from the host's NVIDIA driver through the NVIDIA container toolkit.
FROM python:3.11.11-slim-bookworm

ARG VARIANT=cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 rnnserve

WORKDIR /srv/rnnserve
COPY pyproject.toml README.md ./
COPY rnnserve rnnserve
COPY service service
COPY training training
COPY models models
COPY data/multi30k/SOURCE.md data/tinyshakespeare/SOURCE.md ./data-terms/
# torch first, pinned: the CPU variant from PyTorch's CPU index, the CUDA variant from PyPI
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    else \
      pip install --no-cache-dir torch==2.13.0; \
    fi \
 && pip install --no-cache-dir . \
 && rnnserve archive --models-dir models --model-store /srv/model_store \
 && mkdir -p /srv/run && chown rnnserve /srv/run

USER rnnserve
ENV RNNSERVE_MODEL_STORE=/srv/model_store RNNSERVE_MODELS_DIR=/srv/rnnserve/models RNNSERVE_RUN_DIR=/srv/run
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=30 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["rnnserve", "gateway"]
