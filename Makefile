# The two entry points a newcomer needs (see README.md); both set up .venv first via scripts/setup.sh.
PY := .venv/bin/python

.PHONY: demo test setup

demo: setup
	$(PY) tools/make_shards.py digits --out data/digits --verify

test: setup
	$(PY) -m pytest

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test,demo
	touch $@
