# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedcare-installed

.PHONY: demo test bench install browser clean proto

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "fedcare needs Python >= 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# PyTorch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fedcare demo

# Debian's Chromium for the tests that open report.html and the live dashboard in a browser
# (driven by Playwright, which uses it in place of a browser of its own). Installed with
# apt-get when missing and the user is root; otherwise those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium: the browser tests will skip"; \
	else echo "chromium is missing and installing it needs root: the browser tests will skip"; fi

# Two passes (see tests/conftest.py): what can share the cores, on a worker per core; then
# the tests that need the machine to themselves (deployments, browsers, wall-clock assertions).
test: install browser
	$(PY) -m pytest -m "not serial" -n auto --dist loadfile
	$(PY) -m pytest -m serial

bench: install
	$(PY) benchmarks/sim_overhead.py
	$(PY) benchmarks/flamby_heart.py
	$(PY) benchmarks/flamby.py
	$(PY) benchmarks/deploy_overhead.py
	$(PY) benchmarks/secagg.py
	$(PY) benchmarks/dp_heart.py
	$(PY) benchmarks/imaging.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/load.py
	$(PY) benchmarks/bandwidth.py
	$(PY) benchmarks/buffered.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Regenerate the committed gRPC code after editing the .proto file.
proto: install
	$(PY) -m pip install --quiet "grpcio-tools>=1.85.1"
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. fedcare/transport/proto/fedcare.proto
