# make run   -- install (idempotent) and serve the ensemble on localhost
# make test  -- install (idempotent) and run the test suite (starts a real Triton server)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-all clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	$(PY) -m pip install --quiet -r requirements.txt
	# HAProxy: serve.py's guard on the public HTTP and gRPC ports (and the two-replica load-balancer test);
	# checkov (deploy/kubernetes security scan) in its own venv: it pins old packaging/networkx
	command -v haproxy >/dev/null || (apt-get update -qq && apt-get install -y -qq haproxy)
	# headless Chromium for the test that opens segment.py's index.html (tests/test_client.py)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	test -x $(VENV)/checkov/bin/checkov || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet checkov==3.3.30
	# the project's packages (fundus_hemorrhage, fundus_hemorrhage_ops, _training, _perf), editable: importable from any folder
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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
