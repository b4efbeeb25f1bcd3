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

.PHONY: install lab app test bench gpu-check browser-deps student clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt requirements/bundled.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINTS) -e ".[lab,test]"
	$(PIP) install --quiet --no-deps -r requirements/bundled.txt
	$(PY) -c "import peftlab.cli, peftlab.models, peftlab.data"
	touch $(STAMP)

# JupyterLab refuses to start as root without --allow-root (containers, cloud machines, CI): pass
# it only when the user is root. Both servers print the URL to open (with its token) once ready.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install
	@echo "Starting JupyterLab on notebooks/00_start_here.ipynb; open the http://... URL it prints below."
	$(VENV)/bin/jupyter lab notebooks/00_start_here.ipynb $(ALLOW_ROOT) $(ARGS)

# The Lab as an app (no code cells): Voila serves notebooks/lab.ipynb.
app: install
	@echo "Starting the Lab app (Voila) on notebooks/lab.ipynb; open the http://... URL it prints below."
	$(VENV)/bin/voila notebooks/lab.ipynb $(ARGS)

# Chromium for the browser tests, from Debian's packages (no browser download is possible here).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not found and cannot install it here (needs root and apt-get):" \
	    "the browser tests will skip (and fail where CI is set)"; fi; }

PYTEST := TQDM_DISABLE=1 HF_HUB_OFFLINE=1 $(PY) -m pytest --nbval --nbval-current-env \
  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

# `make test` runs two passes, each spread over WORKERS pytest workers (pytest-xdist; one file per
# worker at a time, so a notebook's cells share one kernel), one thread each: the cores stay busy
# where single-threaded Python, kernel start-ups and small matmuls would leave one idle, and since
# the notebooks are recorded with every thread (tools/nb.py), pass 1 also proves that their stored
# outputs do not depend on the thread count. `make test WORKERS=1` runs the files one by one.
# Pass 1: everything, on this CPU's own instruction set.
# Pass 2 (portability): a representative subset again with PyTorch, oneDNN and MKL forced onto
# another instruction set (AVX2 on x86, PyTorch's plain kernels on ARM) and one thread, so a
# machine with AVX-512 proves the suite passes on one without (README, "Runs on any machine").
# The subset: the numerical tests (parity with peft, bitsandbytes and the fused kernels, every
# method's contract, NF4, the memory ledger, training) and the lessons that train, generate or
# quantise. `make test PORTABILITY=0` runs pass 1 only.
PORTABILITY ?= 1
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PARALLEL := $(if $(filter-out 0 1,$(WORKERS)),-n $(WORKERS) --dist loadfile)
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
FORCED_ISA := $(if $(filter x86_64 amd64,$(shell uname -m)),ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2,ATEN_CPU_CAPABILITY=default)
PORTABLE_ENV := $(FORCED_ISA) $(ONE_THREAD) PEFTLAB_PORTABILITY_PASS=1
PORTABILITY_TESTS := tests/test_portability.py tests/test_fused.py tests/test_lora_parity.py \
  tests/test_contract.py tests/test_methods_additive.py tests/test_methods_orthogonal.py \
  tests/test_methods_weight.py tests/test_nf4.py tests/test_loftq.py tests/test_qlora_trap.py \
  tests/test_memory.py tests/test_train.py tests/test_spectra.py tests/test_peft_cases.py \
  tests/test_conv_layers.py tests/test_cp_conv_and_oft_layers.py tests/test_dora_adalora_layers.py \
  tests/test_lora_mha_bias.py tests/test_parameter_lora.py tests/test_trainable_tokens.py \
  tests/test_soft_prompts_seq2seq.py \
  notebooks/00_start_here.ipynb notebooks/01_lora_from_scratch.ipynb notebooks/03_qlora_and_nf4.ipynb \
  notebooks/08_soft_prompts.ipynb notebooks/11_many_adapters.ipynb

test: install browser-deps
	$(ONE_THREAD) $(PYTEST) $(PARALLEL) notebooks tests $(if $(MARKERS),-m "$(MARKERS)") $(ARGS)
ifeq ($(PORTABILITY),1)
	@echo "== pass 2 (portability): $(PORTABLE_ENV)"
	$(PORTABLE_ENV) $(PYTEST) $(PARALLEL) $(PORTABILITY_TESTS) -m "not browser" -q
endif

# Learner notebooks: the lessons with their answers blanked, nbgrader's way (tools/student.py writes
# notebooks/learner/, which is committed; tests/test_student.py fails when it is out of date).
student: install
	$(PY) tools/student.py

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
