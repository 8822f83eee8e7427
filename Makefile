# make run   -- install (idempotent) and serve the ensemble on localhost
# make test  -- install (idempotent) and run the test suite (starts a real Triton server)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-all clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

run: install
	$(PY) serve.py $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# also the slow tests (a few minutes more)
test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .triton .cache .pytest_cache
