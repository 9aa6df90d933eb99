# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedcare-installed

.PHONY: demo test bench install clean proto

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

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/sim_overhead.py
	$(PY) benchmarks/flamby_heart.py
	$(PY) benchmarks/flamby.py
	$(PY) benchmarks/deploy_overhead.py
	$(PY) benchmarks/secagg.py
	$(PY) benchmarks/dp_heart.py
	$(PY) benchmarks/imaging.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Regenerate the committed gRPC code after editing the .proto file.
proto: install
	$(PY) -m pip install --quiet "grpcio-tools>=1.85.1"
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. fedcare/transport/proto/fedcare.proto
