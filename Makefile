# The two entry points a newcomer needs (see README.md); both set up .venv first via scripts/setup.sh.
PY := .venv/bin/python
# DeepSpeed JIT-builds a small C++ op on first use; keep the build inside this checkout's venv so that two checkouts
# (or a CI clone) never rebuild one shared cache under each other's feet.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions

.PHONY: demo test lint setup slurm

demo: setup
	$(PY) -m pipeline.demo

# The Slurm tests start a real single-node Slurm: its Debian packages are installed first (root or sudo).
test: setup slurm
	$(PY) -m pytest

# ruff, 120 columns (its settings are in pyproject.toml); .ci/run calls it before the tests.
lint: setup
	$(PY) -m ruff check .

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test,demo,http
	touch $@

slurm:
	bash scripts/install_slurm.sh
