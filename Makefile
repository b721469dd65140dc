# Two commands on a fresh machine (Python 3.11 and gcc): `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(wildcard native/*.h native/*.c native/*.py client/*.py slitterd/*.py)

.PHONY: demo test bench bench-all install clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf build *.egg-info
	$(PY) -m pip install --quiet --disable-pip-version-check '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	cd examples && ../$(PY) demo.py

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed
	cd bench && ../$(PY) fastpath.py

# Every benchmark in bench/, as recorded in doc/performance.md (several minutes).
bench-all: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check 'matplotlib>=3.5'
	cd bench && for b in fastpath overhead daemon peers scaling channels backing; do ../$(PY) $$b.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
