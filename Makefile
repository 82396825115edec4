# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   build a virtual environment, make shards from a small real dataset, train on the CPU
#   make test   build a virtual environment, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# Re-install only when the declared dependencies change.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

# --overwrite: each make demo is a fresh run (a run directory otherwise refuses a second run)
# every value accelerate launch would otherwise fill in itself, with a block of warnings on the first screen
THREADS := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)

demo: $(STAMP)
	$(PY) -m data.digits demo_data
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(THREADS) train_imagenet.py --config launch/configs/digits_demo.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_data runs
