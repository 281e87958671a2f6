# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pcd demo demo-work

test: install
	$(PY) -m pytest

clean:
	rm -rf demo-work .pytest_cache
