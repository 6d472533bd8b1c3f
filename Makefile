# The two commands of the README: `make serve` and `make test`. Both set up from nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: serve test setup archive java prometheus redis clean wheelhouse base-image compose-tool docker-smoke gpu-check

serve: java archive
	$(BIN)/rnnserve serve

test: java archive prometheus redis
	$(BIN)/pytest -q

# stops at once, before installing anything, when Java 17 is missing
java:
	@$(PYTHON) service/java.py

# a real Prometheus server for the observability test (Debian's package; CI runs as root)
prometheus:
	@command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	  || { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
	  || echo "warning: could not install Debian's prometheus package: the Prometheus test will be skipped"; }

# a real Redis server for the session store's tests (Debian's package; the tests start their own)
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 \
	  || { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1; } \
	  || echo "warning: could not install Debian's redis-server package: the Redis session tests will be skipped"; }

setup: $(STAMP)

# torch is pinned to the CPU wheel (pyproject.toml); reinstall only when the project file changes
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "rnnserve needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

archive: setup
	$(BIN)/rnnserve archive

clean:
	rm -rf run model_store/*.mar

# --- containers (README, "Deploying") ---
VARIANT ?= cpu

# wheels of torch (VARIANT=cpu|cuda) and every dependency, for `docker build --network none`
wheelhouse:
	deploy/wheelhouse.sh $(VARIANT)

# local base images from Debian packages (debootstrap), for machines that cannot pull them
base-image:
	deploy/base_images.sh

# Docker Compose v2 into .tools/ (the unit tests validate the compose files with it)
compose-tool:
	@deploy/compose.sh

# builds the CPU image offline, runs the compose stack, checks it and removes it again
docker-smoke:
	deploy/docker_smoke.sh

# --- GPU (README, "GPU") ---
# the GPU tests and engine benchmarks, written to gpu-check/gpu-check.{json,md}; on a machine without CUDA it
# says so and fails. Runs without the venv (a GPU machine may have only python3 and torch): the checkout on
# PYTHONPATH, with the links that pyproject's package-dir makes for rnnserve.service and rnnserve.training.
GPU_PYTHON ?= python3
# Java 17, TorchServe and the gateway's packages for a GPU machine with python3 and torch but no network, in parts
# (README, "A GPU machine with no network"): needs a JDK 17 with jmods and the package index
gpu-kit:
	deploy/gpu_kit.sh build

gpu-check:
	@made=""; for p in service training; do test -e rnnserve/$$p || { ln -s ../$$p rnnserve/$$p; made="$$made rnnserve/$$p"; }; done; \
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m rnnserve.gpu_check --out gpu-check; \
	status=$$?; for p in $$made; do rm -f $$p; done; exit $$status
