# Thin wrappers: the README's two commands are `make lab` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ARGS   ?=
# Select tests by marker, e.g. `make test MARKERS="not browser"` skips the real-browser tests
# (JupyterLab + Voila driven through chromium, ~3 min); by default everything runs.
MARKERS ?=
# On a machine without an NVIDIA GPU, pin torch to the CPU build (see requirements/constraints-cpu.txt);
# GPU users get whatever torch their platform's index serves.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c requirements/constraints-cpu.txt)
STAMP := $(VENV)/.peftlab-installed

.PHONY: install lab test bench gpu-check browser-deps clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt requirements/bundled.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINTS) -e ".[lab,test]"
	$(PIP) install --quiet --no-deps -r requirements/bundled.txt
	$(PY) -c "import peftlab.cli, peftlab.models, peftlab.data"
	touch $(STAMP)

lab: install
	$(VENV)/bin/jupyter lab notebooks/00_start_here.ipynb $(ARGS)

# Chromium for the browser tests, from Debian's packages (no browser download is possible here).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not found and cannot install it here (needs root and apt-get):" \
	    "the browser tests will skip (and fail where CI is set)"; fi; }

test: install browser-deps
	TQDM_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider $(if $(MARKERS),-m "$(MARKERS)") $(ARGS)

# `make bench` = `peftlab bench train`; e.g. make bench ARGS="--dtypes bf16 --repeats 3", or BENCH=spectra
BENCH ?= train
bench: install
	$(VENV)/bin/peftlab bench $(BENCH) $(ARGS)

# On a machine with an NVIDIA GPU: the CUDA-only tests, then the benchmark on the GPU (3 rounds).
gpu-check: install
	TQDM_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m gpu -p no:cacheprovider -q -rs $(ARGS)
	$(VENV)/bin/peftlab bench train --repeats 3 --out runs/gpu-bench.html

clean:
	rm -rf $(VENV) build *.egg-info
