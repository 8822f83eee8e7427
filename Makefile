# make run   -- install (idempotent) and serve the ensemble on localhost
# make test  -- install (idempotent) and run the test suite (starts a real Triton server)
# make run-pacs -- install, then Orthanc (DICOM 4242, HTTP/DICOMweb 8042, loopback) + the service + the DICOM gateway
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run run-pacs test test-all clean

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
	# Orthanc + DICOMweb (make run-pacs, tests/test_dicom_gateway.py; docs/dicom.md), dciodvfy (dicom3tools) for the
	# tests; Debian's orthanc package starts a system Orthanc on 4242/8042 where systemd runs: stopped, run-pacs owns them
	test -x /usr/sbin/Orthanc || (apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb && (systemctl disable --now orthanc 2>/dev/null || true))
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || (apt-get update -qq && apt-get install -y -qq orthanc-dicomweb)
	command -v dciodvfy >/dev/null || (apt-get update -qq && apt-get install -y -qq dicom3tools)
	test -x $(VENV)/checkov/bin/checkov || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet checkov==3.3.30
	# the project's packages (fundus_hemorrhage, fundus_hemorrhage_ops, _training, _perf), editable: importable from any folder
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: install
	$(PY) serve.py $(ARGS)

# Orthanc, serve.py and the gateway on loopback; ARGS e.g. "--dicom-allow 127.0.0.1,192.0.2.10 -- --unet-version 2"
run-pacs: install
	$(PY) -m fundus_hemorrhage_dicom.pacs $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# also the slow tests (a few minutes more)
test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .triton .cache .pytest_cache
