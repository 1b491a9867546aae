# mnist_opt — every target sets up .venv itself on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
NAME ?= mlp_tpe
ARGS ?=
WORKERS ?= auto
SEEDS ?= 1
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8080
MLFLOW_PORT ?= 5000
PORT ?= 5001
SCALE_ARGS ?=

# Data: $MNIST_OPT_DATA if set; else ../shared/data when it exists (offline machines);
# else the package downloads the files into ~/.cache/mnist_opt/data.
ifeq ($(origin MNIST_OPT_DATA), undefined)
  ifneq ($(wildcard ../shared/data/mnist),)
    export MNIST_OPT_DATA := $(abspath ../shared/data)
  endif
endif
STORAGE := $(or $(OPTUNA_STORAGE),sqlite:///studies/optuna.db)
TRACKING := $(or $(MLFLOW_TRACKING_URI),sqlite:///mlruns/mlflow.db)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help install pg browser netns compose study retrain report results calibrate lr-find predict serve compare list check docs test test-fast bench bench-quick bench-results bench-throughput throughput-results bench-scale scale-results bench-speedup speedup-results strategies strategies-results dashboard mlflow-ui clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,server]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install mnist_opt with its pinned dependencies (and the tracking server's, for the tests)

pg:  ## install Debian's PostgreSQL server (the tests start a throw-away one on 127.0.0.1)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql >/dev/null; }

browser:  ## install Debian's chromium + chromium-driver for the browser test (tests/test_browser.py)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null; }

study: install  ## run or continue a study: make study NAME=mlp_tpe [WORKERS=auto|N] [ARGS="--n-trials 5"]
	$(BIN)/mnist-opt study $(NAME) --workers $(WORKERS) $(ARGS)

retrain: install  ## retrain the best trial, test it, register it: make retrain NAME=mlp_tpe SEEDS=3
	$(BIN)/mnist-opt retrain $(NAME) --seeds $(SEEDS) $(ARGS)

report: install  ## top trials + Optuna plots (HTML, PNG) in reports/NAME/: make report NAME=mlp_tpe
	$(BIN)/mnist-opt report $(NAME) $(ARGS)

results: install  ## write the README results table from the MLflow runs of study + retrain
	$(BIN)/mnist-opt results --update README.md

calibrate: install  ## time each model family under TensorFlow and JAX for training.backend: auto (minutes): [ARGS="--families mlp"]
	$(BIN)/mnist-opt calibrate $(ARGS)

lr-find: install  ## LR range test, suggested learning_rate range: make lr-find NAME=mlp_tpe [ARGS=--apply]
	$(BIN)/mnist-opt lr-find $(NAME) $(ARGS)

predict: install  ## classify images: make predict IMAGES="a.png b.jpg" [MODEL=models:/mlp_tpe/latest]
	$(BIN)/mnist-opt predict --model $(or $(MODEL),models:/$(NAME)/latest) $(IMAGES)

serve: install  ## serve the registered model over REST (MLflow scoring server): make serve NAME=mlp_tpe [VERSION=V|ALIAS=A] [PORT=5001]
	$(BIN)/mnist-opt serve $(NAME) $(if $(VERSION),--version $(VERSION)) $(if $(ALIAS),--alias $(ALIAS)) --host $(HOST) --port $(PORT)

compare: install  ## compare strategies by time to target: make compare NAME=mlp_tpe ARGS="--strategies tpe+hyperband random+none --budget-seconds 300" [WORKERS=2]
	$(BIN)/mnist-opt compare $(NAME) $(if $(filter command line environment,$(origin WORKERS)),--workers $(WORKERS)) $(ARGS)

list: install  ## list the studies in studies/
	$(BIN)/mnist-opt list

check: install  ## check study files against the schema and the parameter table: make check [ARGS=FILE]
	$(BIN)/mnist-opt check $(ARGS)

docs: install  ## regenerate the README's parameter table from mnist_opt/study/params.py
	$(BIN)/mnist-opt list --params --update README.md

netns:  ## the `ip` tool (Debian's iproute2) for the multi-host test (tests/test_multihost.py)
	@command -v ip >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q iproute2 >/dev/null; }

compose:  ## Debian's docker-compose (no daemon, 16 small packages) for checking deploy/compose.yaml (tests/test_deploy.py)
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	  --no-install-recommends docker-compose >/dev/null; }

test: install pg browser netns compose  ## run the test suite (real training on small subsets, real PostgreSQL, headless chromium)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install  ## the quick loop (< 2 min): no browser, no PostgreSQL, no training beyond seconds
	$(BIN)/python -m pytest -m "not slow and not browser and not postgres" $(PYTEST_ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench  ## mnist_opt vs keras-tuner, like for like and out of the box, 3 repeats (full data; over 2 hours here, latest.md says when each workload ran; resumable; ARGS="--workloads mlp_tpe" runs one)
	$(BIN)/python bench/bench.py $(ARGS)

bench-quick: $(VENV)/.bench  ## the same benchmark reduced (subset, few trials, 2 repeats), in bench/work-quick/
	$(BIN)/python bench/bench.py --quick $(ARGS)

bench-throughput: install  ## trial-epochs per second of make study with 1 worker and every core, and a worker's replacement cost (3 rounds; ~20 min)
	$(BIN)/python bench/throughput.py $(ARGS)

bench-speedup: install  ## make study NAME=mlp_tpe as shipped, 1 worker vs every core, 3 alternating pairs (about 25 min here)
	$(BIN)/python bench/throughput.py --full $(ARGS)

speedup-results: install  ## rewrite bench/results/speedup.md and the README's speedup section from speedup.json
	$(BIN)/python bench/throughput.py --full --render

throughput-results: install  ## rewrite bench/results/throughput.md and the README's throughput section from throughput.json
	$(BIN)/python bench/throughput.py --render

bench-scale: install pg netns  ## N = 1, 4, 16, 64 simulated workers (no training) on one PostgreSQL + one MLflow server in the namespaced bench (root), plain RDB vs the gRPC proxy; [SCALE_ARGS=--quick] (N = 1, 4, 5 trials each, into bench/work/scale-quick/)
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

scale-results: install  ## rewrite bench/results/scale.md and the README's scale section from scale.json
	$(BIN)/python bench/scale.py --render

strategies: install  ## the shipped studies' strategy comparisons into bench/results/compare/ (hours; resumable): [ARGS="--only mlp_tpe"]
	$(BIN)/python bench/strategies.py $(ARGS)

strategies-results: install  ## rewrite the README's strategies section from bench/results/compare/*/summary.json
	$(BIN)/python bench/strategies.py --render

bench-results: $(VENV)/.bench  ## rewrite bench/results/latest.md and the README's bench section from latest.json
	$(BIN)/python bench/bench.py --render

dashboard: install  ## optuna-dashboard on the study storage, http://127.0.0.1:8080
	$(BIN)/optuna-dashboard --host $(HOST) --port $(DASHBOARD_PORT) $(STORAGE)

mlflow-ui: install  ## the MLflow UI on the tracking store, http://127.0.0.1:5000
	@mkdir -p mlruns
	$(BIN)/mlflow ui --host $(HOST) --port $(MLFLOW_PORT) --backend-store-uri $(TRACKING)

clean:  ## remove .venv (studies/*.db and mlruns/ are kept: they hold your results)
	rm -rf $(VENV) *.egg-info
