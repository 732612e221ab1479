# The README's two commands are `make run` (set up + the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# DeepSpeed (the `distributed` extra) builds any op it needs here, not in ~/.cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup run test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,mlops,distributed]'
	touch $@

# The main job: the whole pipeline locally on the built-in toy model.
run: setup
	$(VENV)/bin/mixgrpo run-local

# Every test (CI runs exactly this).
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

# The quick subset while developing.
test-fast: setup
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/mixgrpo bench

clean:
	rm -rf runs .pytest_cache
