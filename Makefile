# onnxserve: `make demo` runs the main job, `make test` the test suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPOSITORY ?= model_repository

.PHONY: demo serve test test-native-asan test-slow export-report seed-accuracy bench lint \
	protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# gRPC C++, from which `pip install` builds the native gRPC transport (setup.py), installed
# first when apt-get can; without it onnxserve installs and serves gRPC with grpcio.
NATIVE_PACKAGES := bash serving/frontends/native/build_packages.sh
NATIVE_SOURCES := setup.py serving/frontends/native/transport.cc

# Stamp files: reinstall when pyproject.toml or the native transport's sources change.
$(VENV)/.export-installed: pyproject.toml $(NATIVE_SOURCES) | $(BIN)/python
	$(NATIVE_PACKAGES)
	$(BIN)/python -m pip install --quiet -e ".[export]"
	touch $@

$(VENV)/.test-installed: pyproject.toml $(NATIVE_SOURCES) | $(BIN)/python
	$(NATIVE_PACKAGES)
	$(BIN)/python -m pip install --quiet -e ".[export,test]"
	touch $@ $(VENV)/.export-installed

demo: $(VENV)/.export-installed
	$(BIN)/onnxserve demo --model-repository $(MODEL_REPOSITORY)

serve: $(VENV)/.export-installed
	$(BIN)/onnxserve serve --model-repository $(MODEL_REPOSITORY)

# The gRPC tests run twice: over the native transport (the default when built), then over
# grpcio's (docs/serving.md#grpc-transports).
test: $(VENV)/.test-installed
	bash tests/support/system_packages.sh
	$(BIN)/python -m pytest -m "not slow"
	if $(BIN)/python -c "from onnxserve.serving.frontends import native; assert native.transport"; \
	then ONNXSERVE_GRPC_TRANSPORT=python $(BIN)/python -m pytest -m "grpc and not slow"; fi

# The native transport built with AddressSanitizer and UndefinedBehaviorSanitizer into
# $(ASAN_VENV) (a regular install: .venv's editable one stays as it is), and the gRPC tests
# over it, servers included (they inherit the preloaded sanitizer runtimes).
ASAN_VENV ?= .venv-asan
test-native-asan:
	$(NATIVE_PACKAGES)
	test -x $(ASAN_VENV)/bin/python || $(PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install --quiet ".[export,test]"
	ONNXSERVE_NATIVE=on ONNXSERVE_NATIVE_SANITIZE=1 $(ASAN_VENV)/bin/python -m pip install \
		--quiet --force-reinstall --no-deps .
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 ONNXSERVE_GRPC_TRANSPORT=native \
		$(ASAN_VENV)/bin/python -m pytest -p no:cacheprovider -m "grpc and not slow"

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow

# Export every seed model (fp32, fp16, int8): parity, size, latency, peak memory.
export-report: $(VENV)/.export-installed
	$(BIN)/python -m onnxserve.benchmarks.export_report

# Full-length training of every recipe on the seed's data (needs the data sets).
seed-accuracy: $(VENV)/.export-installed
	$(BIN)/python -m onnxserve.benchmarks.seed_accuracy $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# Serving benchmark of the demo's models (exports them first if needed), written to the
# committed benchmarks/results. The first bench alone takes about 8-14 minutes; the last
# (speed.md: both clients, the parsing null server, a float-input MobileNetV2) about 10,
# protocols.md (perf_analyzer over gRPC, streaming, HTTP and shared memory) about 8.
bench: $(VENV)/.export-installed
	$(BIN)/python -m pip install --quiet matplotlib
	$(BIN)/onnxserve demo --model-repository $(MODEL_REPOSITORY) > /dev/null
	$(BIN)/onnxserve bench --model-repository $(MODEL_REPOSITORY) --models lenet5 mobilenet_v2 \
		--out benchmarks/results
	$(BIN)/onnxserve bench --model-repository $(MODEL_REPOSITORY) --models lenet5 \
		--samples-per-request 32 --concurrency 1 4 --workers 1 --tag bench_batch32 \
		--out benchmarks/results
	$(BIN)/python -m onnxserve.benchmarks.first_request --model-repository $(MODEL_REPOSITORY) \
		--out benchmarks/results
	test -d $(MODEL_REPOSITORY)/mobilenet_v2_float || $(BIN)/onnxserve export mobilenet_v2 \
		--raw-float-input --name mobilenet_v2_float --weights none \
		--model-repository $(MODEL_REPOSITORY)
	$(BIN)/onnxserve bench --model-repository $(MODEL_REPOSITORY) \
		--models lenet5 mobilenet_v2 mobilenet_v2_float --concurrency 1 16 --batching on \
		--workers 1 --client both --null-parse --tag speed --out benchmarks/results
	$(BIN)/onnxserve bench --model-repository $(MODEL_REPOSITORY) --models lenet5 mobilenet_v2 \
		--concurrency 1 16 --batching on --workers 1 --client perf_analyzer \
		--pa-protocol grpc http --pa-mode plain streaming shared-memory --tag protocols \
		--out benchmarks/results
	$(BIN)/python -m onnxserve.benchmarks.shared_memory --model-repository $(MODEL_REPOSITORY) \
		--model mobilenet_v2 --out benchmarks/results/shared_memory.md

# ruff on everything; mypy on serving/ (tests/support/typecheck.py).
lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/python tests/support/typecheck.py

protos: $(VENV)/.test-installed
	$(BIN)/python -m onnxserve.protos.generate

clean:
	rm -rf $(VENV) $(ASAN_VENV) build $(MODEL_REPOSITORY) samples .pytest_cache .hypothesis
