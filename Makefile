# distillery: `make run` and `make test` do all the set-up on a fresh machine.
#   make run                          default recipe, end to end
#   make recipe=recipes/ci.yaml       any recipe, end to end (RUNS=dir: where runs go, default runs/)
#   make generate|distill|merge|eval|export|bench|report|status recipe=...   one stage (or the report)
#   make serve recipe=...             the student behind an OpenAI-compatible API on 127.0.0.1
#   make test                         the test suite

recipe ?= recipes/default.yaml
RUNS ?= runs
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_VERSION := 0.3.36
# Portable x86-64 build of llama.cpp (AVX2/FMA/F16C: Intel since Haswell, AMD since Zen 1). A -march=native
# build enables AMX on Sapphire Rapids hosts, whose batched prompt path segfaults in virtual machines that do
# not grant AMX tile state; an AVX512 + AVX-VNNI build dies with "Illegal instruction" on AMD Zen 4 (no
# AVX-VNNI) and on laptops without AVX512. The wheel cache is per instruction-set level, so a wheel built
# with other flags is never picked up.
LLAMA_ISA ?= x86-64-v3
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF
# export.imatrix builds llama.cpp's llama-imatrix and llama-quantize with the same flags (toolchain/artifacts/gguf_io.py).
export LLAMA_CMAKE_ARGS
WHEELS ?= $(HOME)/.cache/distillery/wheels/$(LLAMA_ISA)
LLAMA_WHEEL = $(firstword $(wildcard $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl))

.DEFAULT_GOAL := all
.PHONY: all run test setup generate distill merge eval export bench report serve status validate clean-runs

# Every stage in order; the eval stage's quality gate (exit 3) stops the chain before export when the student falls short.
all: $(STAMP)
	$(BIN)/distillery run $(recipe) --runs $(RUNS)

run: all

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	@if [ -z "$(LLAMA_WHEEL)" ]; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) from source (about 8 minutes, once; cached in $(WHEELS))"; \
	  mkdir -p $(WHEELS) && CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(BIN)/pip install --quiet --no-deps --force-reinstall $$(ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl | head -1)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@# llama.cpp's GGUF converter of the same version as the runtime (from its sdist), for export.
	$(BIN)/python -c "from toolchain.artifacts.gguf_io import converter_dir; converter_dir()"
	@# Chromium (Debian package) renders report.html in the report test; installed when running as root.
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install chromium (apt-get install chromium) for the report screenshot test"; fi; }
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

generate distill merge eval export bench report serve status: $(STAMP)
	$(BIN)/distillery $@ $(recipe) --runs $(RUNS)

validate: $(STAMP)
	$(BIN)/distillery $@ $(recipe)

clean-runs:
	rm -rf runs
