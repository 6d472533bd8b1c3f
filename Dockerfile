# One image, two entry points: `rnnserve torchserve` (model server) and `rnnserve gateway`.
#   docker build --build-arg VARIANT=cuda -t rnnserve:cuda .    (default; PyPI's torch bundles CUDA 12)
#   docker build --build-arg VARIANT=cpu  -t rnnserve:cpu .
# The .mar archives are built at image build time from the committed weights: nothing is downloaded
# at run time. The cuda variant's archives carry the GPU worker profile (`rnnserve archive --gpu`). The GPU comes from the host's NVIDIA driver through the NVIDIA container toolkit.
#
# Air-gapped: `make wheelhouse VARIANT=cpu|cuda` fills wheelhouse/ beforehand; with wheels there, pip
# installs from them only (--no-index), so the build needs no network:
#   docker build --network none --build-arg BASE=rnnserve-base:bookworm --build-arg VARIANT=cpu .
# The base must then already hold Java 17 and curl (`make base-image` builds one from Debian packages).
ARG BASE=python:3.11.11-slim-bookworm

FROM ${BASE} AS base
# Java 17 and curl from the base when it has them, otherwise from Debian's mirror
RUN if ! { command -v java && command -v curl; } >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && { java -version 2>&1 | grep -q 'version "17\.' || { echo "TorchServe needs Java 17; the base has: $(java -version 2>&1 | head -1)" >&2; exit 1; }; } \
 && useradd --create-home --uid 10001 rnnserve

FROM base AS build
# lets a script remove this stage's image (the classic builder leaves it behind untagged)
LABEL org.rnnserve.stage=build
ARG VARIANT=cuda
WORKDIR /srv/rnnserve
COPY wheelhouse/ /tmp/wheelhouse/
COPY pyproject.toml README.md ./
COPY rnnserve rnnserve
COPY service service
COPY training training
COPY models models
COPY data/multi30k/SOURCE.md data/tinyshakespeare/SOURCE.md ./data-terms/
# torch first, pinned: from the wheelhouse when there is one (no index at all), otherwise the CPU
# variant from PyTorch's CPU index and the CUDA variant from PyPI. A virtual environment, so that a
# base whose Python is Debian's (externally managed) works the same as the official one.
RUN python3 -m venv /opt/rnnserve \
 && export PATH=/opt/rnnserve/bin:$PATH TORCH=torch==2.13.0 \
 && if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then \
      have=$(cat /tmp/wheelhouse/VARIANT 2>/dev/null); \
      if [ "$have" != "$VARIANT" ]; then \
        echo "wheelhouse/ holds the '$have' variant, this build is '$VARIANT': run 'make wheelhouse VARIANT=$VARIANT'" >&2; \
        exit 1; \
      fi; \
      pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse "$TORCH" .; \
    elif [ "$VARIANT" = "cpu" ]; then \
      pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "$TORCH" && pip install --no-cache-dir .; \
    else \
      pip install --no-cache-dir "$TORCH" && pip install --no-cache-dir .; \
    fi \
 && rnnserve archive --models-dir models --model-store /srv/model_store $([ "$VARIANT" = cuda ] && echo --gpu)

# the wheels stay behind in the build stage
FROM base
COPY --from=build /opt/rnnserve /opt/rnnserve
COPY --from=build /srv/model_store /srv/model_store
COPY --from=build /srv/rnnserve /srv/rnnserve
WORKDIR /srv/rnnserve
RUN mkdir -p /srv/run && chown rnnserve /srv/run
USER rnnserve
ENV PATH=/opt/rnnserve/bin:$PATH \
    RNNSERVE_MODEL_STORE=/srv/model_store RNNSERVE_MODELS_DIR=/srv/rnnserve/models RNNSERVE_RUN_DIR=/srv/run
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=30 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["rnnserve", "gateway"]
