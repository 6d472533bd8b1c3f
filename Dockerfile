# One image, two entry points: `rnnserve torchserve` (model server) and `rnnserve gateway`.
# Archives are built at image build time from the committed weights; nothing is downloaded at run time.
# CPU build by default; the CUDA variant is the deployment issue's (see docker-compose.yml).
FROM python:3.11-slim-bookworm

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
# torch first from PyTorch's CPU index: PyPI's torch==2.13.0 for Linux is a multi-GB CUDA build
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir . \
 && rnnserve archive --models-dir models --model-store /srv/model_store \
 && mkdir -p /srv/run && chown -R rnnserve /srv/run

USER rnnserve
ENV RNNSERVE_MODEL_STORE=/srv/model_store RNNSERVE_MODELS_DIR=/srv/rnnserve/models RNNSERVE_RUN_DIR=/srv/run
EXPOSE 8000
CMD ["rnnserve", "gateway"]
