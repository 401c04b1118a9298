# medpipe: `make demo` and `make test` each bootstrap .venv idempotently, then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo-output

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: venv demo test e2e bench work-pools deploy serve clean

venv: $(STAMP)

# torch==2.13.0 first: on these machines it is a pre-staged CPU wheel; a looser request would pull CUDA builds.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medpipe demo --out $(DEMO)

test: $(STAMP)
	$(VENV)/bin/ruff check medpipe tasks flows
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra -n 2 --dist loadfile tests

# The pipeline on real components, on loopback: a Prefect server, a Dask scheduler and two workers, a moto S3
# server (all separate processes), the deployments served, faults injected; see docs/e2e.md.
e2e: $(STAMP)
	$(PY) -m tests.e2e.run_e2e

# Against the Prefect server in $$PREFECT_API_URL: the two work pools, then every deployment of prefect.yaml.
work-pools: $(STAMP)
	$(VENV)/bin/prefect work-pool create medpipe-cpu --type process --overwrite
	$(VENV)/bin/prefect work-pool create medpipe-gpu --type process --overwrite

deploy: work-pools
	MEDPIPE_REPO=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --all

serve: $(STAMP)
	$(PY) deployments/serve.py

# Issues 11 and 12's figures: each script prints its lines and, last, one JSON object of ratios (docs/benchmarks.md);
# machine.py first: how far this machine's cores and memory scale to 2 processes, the ceiling of the N-worker figures.
# REAL_CT=DIR: folder of real CT series for store_vs_source_ct (e.g. dcm_qa_ct/In), else the GE series in tests/data.
bench: $(STAMP)
	$(PY) benchmarks/machine.py --json
	$(PY) benchmarks/ingest.py --json $(if $(REAL_CT),--real-ct $(REAL_CT))
	$(PY) benchmarks/loader.py --json
	$(PY) benchmarks/signals.py --json

clean:
	rm -rf $(DEMO) .prefect
