# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean wheelhouse docker-test

install: $(STAMP)

# The quick start's install (docs/quickstart.md: this package with its service and onnx extras, then Ultralytics
# without its dependencies, which would pull the GUI opencv-python), after the exact pins: torch/torchvision
# first (served from the local wheel cache here), then requirements.txt.
$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install -q -e ".[service,onnx]"
	$(BIN)/pip install -q --no-deps "ultralytics==8.4.190"
	# SpikingJelly (cross-check of the IF baseline) without its declared torchaudio/tensorboard stack
	$(BIN)/pip install -q --no-deps spikingjelly==2.0.0
	# The recorder's fused spike counter, built now rather than on the first recorded run (it needs a C++
	# compiler; without one it says so and recording counts with eager PyTorch)
	$(BIN)/python -m detector.spike_counts
	touch $@

demo: install
	$(BIN)/casc demo

test: install
	$(BIN)/python -m pytest -q

# The inner loop: the core's unit and exactness tests (no detector training, no servers, no export).
FAST_TESTS := tests/test_quant.py tests/test_neurons.py tests/test_pooling.py tests/test_soundness.py \
	tests/test_run_result.py tests/test_checkpoint.py tests/test_metrics.py tests/test_record_metrics.py \
	tests/test_images.py tests/test_k8s.py
test-fast: install
	$(BIN)/python -m pytest -q $(FAST_TESTS)

bench: install
	$(BIN)/python benchmarks/runtime.py

# Offline wheels for air-gapped image builds (docker/README.md), then a real build-and-run check.
wheelhouse:
	bash docker/wheelhouse.sh

docker-test: install
	bash docker/test_image.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
