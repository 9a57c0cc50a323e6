# The two entry points a newcomer needs (see README.md); both set up .venv first via scripts/setup.sh.
PY := .venv/bin/python
# DeepSpeed JIT-builds a small C++ op on first use; keep the build inside this checkout's venv so that two checkouts
# (or a CI clone) never rebuild one shared cache under each other's feet.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions

.PHONY: demo test lint setup slurm

demo: setup
	$(PY) -m pipeline.demo

# The Slurm tests start a real Slurm: its Debian packages are installed first (root or sudo).
# The single-process tests run on every core, at most 8 (pytest-xdist; each file on one worker, so its fixtures are
# built once); the slow multi-process tests then run one at a time, since their ranks already fill the cores. Both
# parts always run; the target fails if either does.
test: setup slurm
	status=0; \
	$(PY) -m pytest -m "not slow" -n auto --maxprocesses 8 --dist loadfile || status=$$?; \
	$(PY) -m pytest -m slow || status=$$?; \
	exit $$status

# ruff, 120 columns (its settings are in pyproject.toml); .ci/run calls it before the tests.
lint: setup
	$(PY) -m ruff check .

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test,demo,http
	touch $@

slurm:
	bash scripts/install_slurm.sh
